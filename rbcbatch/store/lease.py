"""A run folder's lease: one `rbcbatch run` at a time writes into a folder.

Two runs into one folder would both process every uncommitted slide (the results stay
consistent, but the work is done twice). A run holds `_lease.json` (its run id, host, process
id and when it last renewed the lease) while it works and renews it from a background thread;
a second run refuses while the lease is live. A lease is dead when its process is gone (same
host) or it has not been renewed for LEASE_TTL_S (another host), so a run killed with SIGKILL
does not lock its folder for good. Object stores have no exclusive create: the lease is
written, then read back, and the run that does not find its own id there steps back.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from rbcbatch.errors import RunFolderInUseError

LEASE_FILE = "_lease.json"
# A live run renews its lease this often, and a lease not renewed for LEASE_TTL_S is dead: five
# missed renewals, so a busy driver or a slow object store never loses a live lease.
RENEW_EVERY_S = 60.0
LEASE_TTL_S = 300.0
# Run ids whose lease this process holds now: a lease left by an earlier run of this same
# process (one that could not release it, its store being unreachable) is not live.
_HELD: set[str] = set()


def this_host() -> str:
    return socket.gethostname()


def read_lease(fs, root: str) -> dict | None:
    path = f"{root}/{LEASE_FILE}"
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except ValueError:  # a torn write: nobody holds it
        return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_live(lease: dict, now: float | None = None) -> bool:
    """Whether the run holding `lease` may still be working."""
    now = time.time() if now is None else now
    fresh = now - float(lease.get("renewed_at", 0)) < LEASE_TTL_S
    if lease.get("host") == this_host():
        pid = int(lease.get("pid", -1))
        if pid == os.getpid():
            return lease.get("run_id") in _HELD
        return fresh and _process_alive(pid)
    return fresh


def in_use_message(url: str, lease: dict, now: float | None = None) -> str:
    now = time.time() if now is None else now
    age = now - float(lease.get("renewed_at", 0))
    return (
        f"{url} is in use by run {lease.get('run_id')} on host {lease.get('host')} "
        f"(pid {lease.get('pid')}), started {lease.get('started_at')}, lease renewed {age:.0f} s "
        "ago. Two runs into one folder would each process every uncommitted slide. Wait for that "
        "run to finish, or pass --force if it is no longer running."
    )


def _write(fs, root: str, lease: dict) -> None:
    fs.makedirs(root, exist_ok=True)
    tmp = f"{root}/.{LEASE_FILE}.{lease['run_id']}.tmp"
    fs.pipe_file(tmp, json.dumps(lease, sort_keys=True).encode())
    fs.mv(tmp, f"{root}/{LEASE_FILE}")


def acquire(fs, root: str, url: str, run_id: str, force: bool = False) -> dict:
    """Take the folder's lease for `run_id`, or raise RunFolderInUseError naming its holder."""
    current = read_lease(fs, root)
    if current and current.get("run_id") != run_id and is_live(current) and not force:
        raise RunFolderInUseError(in_use_message(url, current))
    now = time.time()
    lease = {
        "run_id": run_id,
        "host": this_host(),
        "pid": os.getpid(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "renewed_at": now,
    }
    _write(fs, root, lease)
    held = read_lease(fs, root)
    if not held or held.get("run_id") != run_id:  # another run wrote after us: it goes on
        raise RunFolderInUseError(in_use_message(url, held or {}))
    _HELD.add(run_id)
    return lease


def release(fs, root: str, run_id: str) -> None:
    """Give the lease up, if it is still ours."""
    _HELD.discard(run_id)
    held = read_lease(fs, root)
    if held and held.get("run_id") == run_id:
        fs.rm(f"{root}/{LEASE_FILE}")


@contextmanager
def holding(fs, root: str, url: str, run_id: str, force: bool = False) -> Iterator[dict]:
    """Hold the folder's lease for the block, renewing it every RENEW_EVERY_S."""
    lease = acquire(fs, root, url, run_id, force)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(RENEW_EVERY_S):
            try:
                _write(fs, root, {**lease, "renewed_at": time.time()})
            except Exception:  # a missed renewal is not fatal: five in a row are
                continue

    keeper = threading.Thread(target=renew, name="rbcbatch-lease", daemon=True)
    keeper.start()
    try:
        yield lease
    finally:
        _HELD.discard(run_id)
        stop.set()
        keeper.join(timeout=5)
        # The folder may be unreachable (the very error that ends the run): the lease then
        # dies by its TTL.
        with suppress(Exception):
            release(fs, root, run_id)
