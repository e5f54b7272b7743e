"""Files written safely: atomic replacement, modes that honour the umask, folder locks.

A reader of a file written by :func:`write_atomic` sees the old complete file or the new
complete file, never a mixture. :class:`FolderLock` gives one process at a time the right
to write into a folder; the operating system releases it when the process ends, however
it ends (even ``kill -9``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from pathlib import Path

TEMP_SUFFIX = ".tmp"
LOCK_NAME = ".lock"


def _umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder.

    The temporary file is flushed and fsynced, given the mode a newly created file
    gets (``0o666 & ~umask``: 0644 under umask 022), renamed over ``path`` (atomic on
    POSIX), and the folder is fsynced so the rename itself survives a crash. Temporary
    files end in ``.tmp``; one left by a killed process is safe to delete. On any error
    (a full disk, say) the temporary file is removed, ``path`` keeps its old content,
    and the ``OSError`` names ``path``.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    try:
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as error:
        raise _naming(error, path) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException as error:
        Path(temp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _naming(error, path) from None
        raise
    fsync_folder(path.parent)


def _naming(error: OSError, path: Path) -> OSError:
    """``error`` with ``path`` as its file name (a failed ``write`` names no file)."""
    if error.errno is None:
        return error
    return type(error)(error.errno, error.strerror or os.strerror(error.errno), str(path))


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Make a rename inside ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_leftovers(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files an interrupted :func:`write_atomic` left in ``folder``."""
    removed = []
    for leftover in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


# --------------------------------------------------------------------------------------
# One writer per folder
# --------------------------------------------------------------------------------------


class FolderInUseError(OSError):
    """Another process holds the folder's lock; the message names its PID."""


# folder (resolved) -> [open lock file descriptor, holders in this process]
_held: dict[Path, list[int]] = {}


class FolderLock:
    """An exclusive lock on ``folder``: ``flock`` on ``folder/.lock``, holding our PID.

    Only one process at a time can hold it; a second gets :class:`FolderInUseError`
    at once (no waiting) naming the holder's PID. The kernel drops the lock when the
    holder's process ends, so a killed process never leaves the folder locked. Within
    one process the lock is re-entrant (the command line takes it early, the training
    functions take it again). ``create=True`` makes the folder if needed and removes it
    on release if nothing else was written into it. Use as a context manager, or
    :meth:`acquire` and :meth:`release`.
    """

    def __init__(self, folder: str | os.PathLike[str], *, create: bool = False) -> None:
        self.folder = Path(folder)
        self.create = create
        self._created = False
        self._key: Path | None = None

    def acquire(self) -> FolderLock:
        if self.create and not self.folder.exists():
            try:
                self.folder.mkdir(parents=True)
                self._created = True
            except FileExistsError:
                pass
            except OSError as error:
                raise _naming(error, self.folder) from None
        key = self.folder.resolve()
        if key in _held:
            _held[key][1] += 1
            self._key = key
            return self
        lock_path = key / LOCK_NAME
        while True:
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as error:
                self._remove_created()
                raise _naming(error, lock_path) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = _read_pid(fd)
                os.close(fd)
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise _naming(error, lock_path) from None
                who = f"process {holder}" if holder else "another process"
                raise FolderInUseError(
                    errno.EBUSY,
                    f"{who} is writing into this run folder; wait for it to end or stop it",
                    str(self.folder),
                ) from None
            # the previous holder may have removed the file between our open and flock
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held[key] = [fd, 1]
        self._key = key
        return self

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None:
            return
        entry = _held[key]
        entry[1] -= 1
        if entry[1]:
            return
        del _held[key]
        (key / LOCK_NAME).unlink(missing_ok=True)  # unlinked while still locked: no race
        os.close(entry[0])
        self._remove_created()

    def _remove_created(self) -> None:
        if self._created:
            self._created = False
            try:
                self.folder.rmdir()  # only if empty
            except OSError:
                pass

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
