"""A private PostgreSQL server on 127.0.0.1 for tests (Debian's postgresql package, a temp data dir).

``.ci/run`` starts one with ``python tests/postgres_server.py start DIR`` and exports its URL as
``LABELMATCH_TEST_POSTGRES_URL``; without that variable the ``postgres_url`` fixture starts its
own for the test session. Each test gets a fresh database (:func:`fresh_database`).

PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` user the
package creates.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from model_server import free_port

URL_ENV = "LABELMATCH_TEST_POSTGRES_URL"


def _bindir() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "initdb").is_file():
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def available() -> bool:
    """Whether PostgreSQL's server programs are installed (or a server is given by URL)."""
    return bool(os.environ.get(URL_ENV)) or _bindir() is not None


def _as_server_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def start(root: str | Path) -> str:
    """initdb + start a server under ``root`` on 127.0.0.1 (a free port); return its base URL.

    The URL names the ``postgres`` database; :func:`fresh_database` makes one per test.
    """
    bindir = _bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
        root.chmod(0o755)
    subprocess.run(_as_server_user([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                                    "-E", "UTF8", "--no-sync"]), check=True, capture_output=True)
    (root / "port").write_text(str(free_port()))
    return resume(root)


def resume(root: str | Path) -> str:
    """Start the server initialised under ``root`` again, on its port (after :func:`stop`)."""
    bindir = _bindir()
    assert bindir is not None
    root = Path(root)
    port = int((root / "port").read_text())
    options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {root / 'sockets'} -c fsync=off "
               "-c max_connections=200")
    start_server = [str(bindir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "server.log"), "-o",
                    options, "-w", "-t", "60", "start"]
    subprocess.run(_as_server_user(start_server), check=True, capture_output=True)
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"


def stop(root: str | Path) -> None:
    """Stop the server started under ``root``."""
    bindir = _bindir()
    if bindir is not None and (Path(root) / "data").is_dir():
        subprocess.run(_as_server_user([str(bindir / "pg_ctl"), "-D", str(Path(root) / "data"), "-m", "fast",
                                        "-w", "stop"]), check=False, capture_output=True)


@contextlib.contextmanager
def running() -> str:
    """A server for the duration of the ``with`` block (or the one named by ``URL_ENV``)."""
    if os.environ.get(URL_ENV):
        yield os.environ[URL_ENV]
        return
    root = Path(tempfile.mkdtemp(prefix="labelmatch-pg-"))
    try:
        yield start(root)
    finally:
        stop(root)
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(base_url: str) -> str:
    """Create an empty database on the server of ``base_url``; return its URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(base_url)
    name = f"t_{uuid.uuid4().hex[:16]}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(host=url.host, port=url.port, user=url.username, dbname=url.database,
                                 autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    return url.set(database=name).render_as_string(hide_password=False)


if __name__ == "__main__":  # python tests/postgres_server.py start|stop DIR
    action, directory = sys.argv[1], sys.argv[2]
    if action == "start":
        print(start(directory))
    else:
        stop(directory)
