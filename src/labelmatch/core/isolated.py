"""Run one function in a fresh Python process, for steps whose memory must be given back.

``multiprocessing``'s spawn start method re-imports the caller's ``__main__``, which fails in a
script without an ``if __name__ == "__main__"`` guard; :func:`run_isolated` starts
``python -m labelmatch.core.isolated`` instead, hands it the pickled call in a temp file and reads
the pickled result (or exception) back. When the process ends, everything the step's libraries
kept (protobuf copies, allocator caches) goes back to the system.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labelmatch.core.errors import LabelmatchError


def run_isolated(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a new interpreter; its result, or its exception raised here.

    Args:
        fn: A module-level function (picklable by reference).
        args: Picklable positional arguments.
        kwargs: Picklable keyword arguments.

    Raises:
        LabelmatchError: when the process dies without a result (killed, e.g. out of memory).
    """
    with tempfile.TemporaryDirectory(prefix="labelmatch-step-") as tmp:
        call, result = Path(tmp) / "call.pkl", Path(tmp) / "result.pkl"
        call.write_bytes(pickle.dumps((fn, args, kwargs)))
        process = subprocess.run([sys.executable, "-m", "labelmatch.core.isolated", str(call), str(result)],
                                 check=False)
        if not result.is_file():
            raise LabelmatchError(f"{fn.__module__}.{fn.__qualname__} ran in its own process, which ended "
                                  f"with status {process.returncode} and no result (killed? out of memory?)")
        ok, value = pickle.loads(result.read_bytes())
    if not ok:
        raise value
    return value


def _main(call: str, result: str) -> None:
    fn, args, kwargs = pickle.loads(Path(call).read_bytes())
    try:
        outcome = (True, fn(*args, **kwargs))
    except Exception as exc:
        outcome = (False, exc)
    try:
        payload = pickle.dumps(outcome)
    except Exception as exc:  # an unpicklable exception still reaches the caller, as text
        payload = pickle.dumps((False, LabelmatchError(f"{type(outcome[1]).__name__}: {outcome[1]}"
                                                       f" (not picklable: {exc})")))
    Path(result).write_bytes(payload)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
