"""Writer locks: one apmpipe process at a time writes a cache (``extract``), an embedding folder (``embed``) or a
training run folder (``train``), local or on an object store.

* Local folders: a POSIX record lock (``lockf``) on ``.apmpipe-COMMAND.lock``, which also holds the holder's pid.
  It belongs to the locking process alone (forked DataLoader workers do not inherit it) and the kernel drops it
  the moment that process dies: a rerun right after ``kill -9`` proceeds. The holder deletes the file before it
  lets go (a finished cache holds zarr's files alone: zarr-python warns about any other object it lists), so a
  taker checks after locking that the file it locked is still the one at the path, and retries if not.
* Object stores have no locks: the lock is a small JSON object ``.apmpipe-COMMAND.lock`` naming its holder (host,
  pid, a random token) and the time it was last renewed, renewed every ``LEASE_SECONDS / 4`` by a thread of the
  holder and deleted when the holder finishes. A lock is stale, and is taken over, when its holder ran on this host
  and is dead (a ``kill -9``) or when it was not renewed for ``LEASE_SECONDS`` (a dead holder elsewhere; the hosts'
  clocks must agree to within that). A taker writes its own lock, waits a moment and reads it back: of two runs
  started in the same instant, the one whose lock was overwritten is refused (stores without conditional writes
  cannot do better than that).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import CacheError
from .redact import redact_url

LEASE_SECONDS = 60.0  # an object-store lock not renewed for this long belongs to a dead holder
SETTLE_SECONDS = 0.2  # a taker reads its lock back after this long (a rival's write lands in between)

_LOCKED_HERE: set[str] = set()  # locks this process holds: POSIX record locks never exclude their own process


def lock_name(command: str) -> str:
    """The lock file of the folder ``apmpipe COMMAND`` writes while it writes (deleted when it finishes)."""
    return f".apmpipe-{command}.lock"


def _busy(url: str, command: str, holder: str) -> CacheError:
    what = "cache" if command == "extract" else "--out"
    return CacheError(
        f"{what} {redact_url(url)!r} is being written by another apmpipe {command} ({holder}); wait for it to "
        "finish or use another --out"
    )


@contextlib.contextmanager
def writer_lock(url: str, command: str = "extract", storage_options: dict[str, Any] | None = None) -> Iterator[None]:
    """Hold the writer lock of the folder ``url`` that ``apmpipe COMMAND`` writes for one run (see the module
    docstring); a second run is refused at once, naming the holder."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        with _local_lock(url, command, path):
            yield
        return
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))  # options only for remote stores
    with _object_lock(url, command, fs, f"{path.rstrip('/')}/{lock_name(command)}"):
        yield


@contextlib.contextmanager
def _local_lock(url: str, command: str, path: str) -> Iterator[None]:
    os.makedirs(path, exist_ok=True)
    lock_path = os.path.realpath(os.path.join(path, lock_name(command)))
    if lock_path in _LOCKED_HERE:
        raise _busy(url, command, f"pid {os.getpid()}, this process")
    fd = _lock_file_at(url, command, lock_path)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _LOCKED_HERE.add(lock_path)
        try:
            yield
        finally:
            _LOCKED_HERE.discard(lock_path)
            with contextlib.suppress(OSError):
                os.unlink(lock_path)  # while still locked: a taker that opened it sees it gone and retries
    finally:
        os.close(fd)  # releases the lock


def _lock_file_at(url: str, command: str, lock_path: str) -> int:
    """An open descriptor of the file at ``lock_path``, record-locked by this process; refused when another holds it.
    A file its holder deleted between our open and our lock is not the lock any more: open the path again."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise _busy(url, command, f"pid {holder}") from None
        if _same_file(fd, lock_path):
            return fd
        os.close(fd)


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _read_holder(fs: fsspec.AbstractFileSystem, key: str) -> dict[str, Any] | None:
    try:
        return json.loads(fs.cat_file(key))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):  # a torn or foreign object: nobody can be holding it
        return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _holder_alive(holder: dict[str, Any]) -> bool:
    """Whether the run that wrote ``holder`` may still be writing (see the module docstring)."""
    if not holder or time.time() - float(holder.get("renewed", 0)) > LEASE_SECONDS:
        return False
    if holder.get("host") == socket.gethostname():
        return _pid_alive(int(holder.get("pid", 0)))
    return True


def _describe(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid', 'unknown')} on {holder.get('host', 'an unknown host')}"


@contextlib.contextmanager
def _object_lock(url: str, command: str, fs: fsspec.AbstractFileSystem, key: str) -> Iterator[None]:
    if key in _LOCKED_HERE:
        raise _busy(url, command, f"pid {os.getpid()}, this process")
    holder = _read_holder(fs, key)
    if holder is not None and _holder_alive(holder):
        raise _busy(url, command, _describe(holder))
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "token": secrets.token_hex(8)}

    def renew() -> None:
        fs.pipe_file(key, json.dumps({**mine, "renewed": time.time()}).encode())

    renew()
    time.sleep(SETTLE_SECONDS)
    now = _read_holder(fs, key) or {}
    if now.get("token") != mine["token"]:
        raise _busy(url, command, _describe(now))
    stop = threading.Event()
    renewer = threading.Thread(target=_renew_until, args=(stop, renew), name="apmpipe-lock-renewal", daemon=True)
    renewer.start()
    _LOCKED_HERE.add(key)
    try:
        yield
    finally:
        _LOCKED_HERE.discard(key)
        stop.set()
        renewer.join()
        if (_read_holder(fs, key) or {}).get("token") == mine["token"]:
            fs.rm_file(key)


def _renew_until(stop: threading.Event, renew: Callable[[], None]) -> None:
    """Renew the lock every quarter lease until ``stop`` (a failed renewal is retried at the next one)."""
    while not stop.wait(LEASE_SECONDS / 4):
        with contextlib.suppress(OSError):
            renew()
