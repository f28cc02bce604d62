"""Room on disk for a step that writes large files: checked before the step starts, and its
libraries' scratch files kept on the filesystem that was checked.

A bge-m3 export writes several 2.3 GB graphs, and ONNX Runtime's quantisation tools write their
own copies under :func:`tempfile.gettempdir` (``pre.quant.*``, ``ort.quant.*``). On a pod whose
``/tmp`` is small, or a disk that fills halfway, the step used to die deep inside ONNX Runtime
("Failed to write external initializers", ``ENOSPC``) after many minutes of work.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from labelmatch.core.errors import ArtifactError

GB = 1e9


def free_bytes(path: str | Path) -> int:
    """Bytes free to this user on the filesystem that holds ``path`` (or its nearest existing parent)."""
    here = Path(path).resolve()
    while not here.exists():
        here = here.parent
    return shutil.disk_usage(here).free


def require_free_space(path: str | Path, need_bytes: int, what: str) -> None:
    """Refuse a step, in one line, when the filesystem of ``path`` has less than ``need_bytes`` free.

    Args:
        path: Where the step writes (its output, or the directory it goes in).
        need_bytes: The most the step holds on disk at once.
        what: The step, for the message (e.g. ``"export of /models/m"``).

    Raises:
        ArtifactError: with the bytes needed and free, before anything is written.
    """
    free = free_bytes(path)
    if free < need_bytes:
        raise ArtifactError(f"{what} needs about {need_bytes / GB:.1f} GB free on the filesystem of "
                            f"{path}, which has {free / GB:.1f} GB: free some space or write elsewhere")


@contextmanager
def scratch_beside(out: str | Path) -> Iterator[Path]:
    """Send the block's temp files to a directory beside ``out``, on the same filesystem.

    Inside the block :func:`tempfile.gettempdir` (and ``TMPDIR`` for the processes the block
    starts, e.g. :func:`~labelmatch.core.isolated.run_isolated`) is a new directory beside
    ``out``; both are restored, and the directory removed, when the block ends. Temp files are
    process-wide: a thread running meanwhile writes its own there too.

    Args:
        out: The step's output path (need not exist yet).

    Yields:
        The scratch directory.
    """
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.scratch-", dir=out.parent))
    saved_dir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = str(scratch), str(scratch)
    try:
        yield scratch
    finally:
        tempfile.tempdir = saved_dir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(scratch, ignore_errors=True)
