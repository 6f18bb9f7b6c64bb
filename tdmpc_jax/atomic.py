"""Crash-safe files and directories, and one-run-per-directory locks.

* `write_file`: a file is replaced whole (temp file, fsync, `os.replace`) or not at all.
* `replace_dir`: a directory (a checkpoint: train state, replay buffer, counters) is replaced whole.
  Protocol, for `T` = the target: build into a fresh `.tmp-T-*` staging dir; rename it to `T.new`
  (a complete new version now exists); rename `T` to `T.old`; rename `T.new` to `T`; delete `T.old`.
  `recover_dir` (run before every read and every replace) finishes or rolls back an interrupted
  swap from any intermediate state: `T.new` is complete, so it wins over `T`; `T.old` is deleted
  once `T` exists (however much of it a killed `rmtree` left) and renamed back when it does not.
* `RunLock`: an exclusive, non-blocking `fcntl.flock` on `DIR/.lock`; the kernel drops it when the
  holder dies, so a killed run never leaves a stale lock. A second run fails with the holder's pid.

`_fault_hook(step, path)`, when set (tests only), is called before every filesystem step, so a
test can "kill" the process at each one and check that a rerun recovers.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import tempfile
import time
from typing import Callable, Optional, Sequence

_fault_hook: Optional[Callable[[str, str], None]] = None
STAGING_PREFIX = ".tmp-"


def _step(name: str, path: str):
    if _fault_hook is not None:
        _fault_hook(name, path)


def _fsync_dir(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: str):
    """Flush every file below `path` (and the directories) to disk before it is renamed into place."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def write_file(path, content=None, *, writer: Optional[Callable] = None, binary: bool = False) -> str:
    """Atomically replace `path` with `content` (str/bytes), or with what `writer(f)` writes to f."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    _step("write", path)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f"{STAGING_PREFIX}{os.path.basename(path)}-")
    try:
        try:  # mkstemp makes 0600 files: keep the replaced file's mode, else the usual 0644
            os.fchmod(fd, stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:
            os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            if writer is not None:
                writer(f)
            else:
                f.write(content)
            f.flush()
            os.fsync(f.fileno())
        _step("replace", path)
        os.replace(tmp, path)
    except Exception:  # a real error: leave nothing behind (a kill leaves tmp for remove_stale)
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(parent)
    return path


def _paths(target: str):
    target = os.path.abspath(os.fspath(target))
    return target, target + ".new", target + ".old"


def recover_dir(target) -> bool:
    """Complete or roll back an interrupted `replace_dir(target)`; -> whether `target` exists."""
    target, new, old = _paths(target)
    parent = os.path.dirname(target)
    if os.path.isdir(new):  # a complete new version was committed: finish installing it
        if os.path.exists(target):
            if os.path.exists(old):
                _step("recover-remove", old)
                shutil.rmtree(old)
            _step("recover-retire", target)
            os.rename(target, old)
        _step("recover-install", new)
        os.rename(new, target)
        _fsync_dir(parent)
    if os.path.exists(old):
        if os.path.exists(target):  # the swap finished; only the clean-up was cut short
            _step("recover-remove", old)
            shutil.rmtree(old)
        else:  # killed between retiring the old version and installing the new one
            _step("recover-restore", old)
            os.rename(old, target)
            _fsync_dir(parent)
    return os.path.exists(target)


def replace_dir(target, build: Callable[[str], None]) -> str:
    """Atomically replace directory `target` by what `build(path)` creates at `path` (not yet existing)."""
    target, new, old = _paths(target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    recover_dir(target)
    if os.path.lexists(new):  # recover_dir consumes a T.new directory: this is something else
        raise OSError(errno.EEXIST, "not a directory of ours, in the way", new)
    _step("stage", target)
    staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.path.basename(target)}-", dir=parent)
    built = os.path.join(staging, os.path.basename(target))
    try:
        build(built)
        _step("built", built)
        _fsync_tree(built)
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _step("commit", new)
    os.rename(built, new)
    _fsync_dir(parent)
    _step("remove-staging", staging)
    os.rmdir(staging)
    if os.path.exists(target):
        _step("retire", target)
        os.rename(target, old)
    _step("install", new)
    os.rename(new, target)
    _fsync_dir(parent)
    if os.path.exists(old):
        _step("remove-old", old)
        shutil.rmtree(old)
    return target


def remove_stale(directory, targets: Sequence[str], legacy: Sequence[str] = ()):
    """Delete what writers of `targets` (names in `directory`) left when killed mid-write: their
    `.tmp-<name>-*` staging files and dirs, and entries starting with a `legacy` prefix.

    Call only while holding the directory's RunLock: nobody else may be writing them."""
    prefixes = tuple(f"{STAGING_PREFIX}{t}-" for t in targets) + tuple(legacy)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith(prefixes):
            p = os.path.join(directory, name)
            _step("remove-stale", p)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                try:
                    os.remove(p)
                except FileNotFoundError:
                    pass


class RunLockedError(RuntimeError):
    """Another live process holds the run directory."""


class RunLock:
    """`with RunLock(dir):` exclusive use of a run directory (non-blocking flock on `dir/.lock`)."""

    def __init__(self, directory):
        self.directory = os.path.abspath(os.fspath(directory))
        self.path = os.path.join(self.directory, ".lock")
        self._fd = None

    def acquire(self) -> "RunLock":
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            holder = _read_pid(fd)
            os.close(fd)
            raise RunLockedError(f"{self.directory} is in use by another run (pid {holder}); wait for it to "
                                 f"finish or choose another --output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self):
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)  # closing drops the flock

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_pid(fd) -> str:
    for _ in range(20):  # the holder writes its pid right after locking
        s = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if s:
            return s
        time.sleep(0.025)
    return "unknown"
