"""Keeping Ray's own output off the user's console.

Ray prints from its Python loggers (token authentication, "Started a local Ray instance"),
from the driver's C++ core worker straight to file descriptor 2 ("constructor arguments in the
object store and max_restarts > 0"), and through Python warnings. None of it is for a person
running a screening, and it reads like an error. While Ray works, descriptor 2 points to a log
file in the run folder (`_logs/ray-<time>.log`; a local file uploaded there at the end for runs
on an object store) and rbcbatch's own console writes to the terminal it had. `--verbose`
leaves everything on the console.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from rich.console import Console

from rbcbatch.io.storage import protocol

LOG_FOLDER = "_logs"


def _local_log(out: str) -> tuple[Path, bool]:
    """Where the log goes on this machine, and whether it must be uploaded afterwards."""
    name = f"ray-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.log"
    if protocol(out) == "file":
        folder = Path(out.removeprefix("file://")) / LOG_FOLDER
        with suppress(OSError):  # read-only or full: the run itself says so, clearly
            folder.mkdir(parents=True, exist_ok=True)
            return folder / name, False
    fd, path = tempfile.mkstemp(prefix="rbcbatch-", suffix=f"-{name}")
    os.close(fd)
    return Path(path), protocol(out) != "file"


@contextmanager
def ray_output_to_log(
    out: str, console: Console, storage_options: dict | None = None, verbose: bool = False
) -> Iterator[Path | None]:
    """For the block, Ray's console output goes to a log file; `console` keeps the terminal.

    Yields the log's local path (None with `verbose`).
    """
    if verbose:
        yield None
        return
    path, upload = _local_log(out)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    # Where our own messages go meanwhile: the terminal behind descriptor 2, or whatever
    # sys.stderr is when it is not descriptor 2 (a test runner capturing it).
    own = _is_descriptor_2(sys.stderr)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1) if own else sys.stderr
    log = open(path, "ab", buffering=0)  # noqa: SIM115 - held until the block ends
    previous = console._file  # None: follow sys.stderr, as rich does by default
    os.dup2(log.fileno(), 2)
    console.file = terminal
    try:
        yield path
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        console.file = previous
        if own:
            terminal.close()
        log.close()
        if upload:
            _upload(path, out, storage_options)


def _is_descriptor_2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


def _upload(path: Path, out: str, storage_options: dict | None) -> None:
    """Copy the log into the run folder on its object store; a failure to do so loses a log only."""
    import fsspec

    with suppress(Exception):
        fs, root = fsspec.core.url_to_fs(out, **(storage_options or {}))
        fs.put_file(str(path), f"{root.rstrip('/')}/{LOG_FOLDER}/{path.name.split('-', 1)[1]}")
        path.unlink()
