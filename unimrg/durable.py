"""Writing run files so that a crash or a full disk loses nothing already marked done.

    python -m pytest tests/unit/test_durable.py -q

A checkpoint is whole only once its data is on disk: the trainer fsyncs its files and folder before
``COMPLETE``, and ``COMPLETE`` before ``latest`` (an atomic, fsynced replace). Write failures become
errors that name the path, the cause (full disk, read-only folder) and the fix.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

FULL_BELOW = 16 << 20   # bytes free under which a failed write is reported as a full disk


class RunFolderError(OSError):
    """A run or checkpoint folder that cannot be written; the message (the only argument) names the
    path, the cause and the fix."""


def fsync_path(path: Path) -> None:
    """Flush one file or folder (a folder: the names in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder``, then the folders themselves (deepest first)."""
    dirs = []
    for root, _, files in os.walk(folder):
        dirs.append(Path(root))
        for f in files:
            fsync_path(Path(root) / f)
    for d in reversed(dirs):
        fsync_path(d)


def write_durably(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text``, on disk (file and folder entry) when this returns."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def free_bytes(path: Path) -> int:
    """Bytes available to this user on the file system holding ``path`` (or its nearest existing parent)."""
    st = os.statvfs(_existing(path))
    return st.f_bavail * st.f_frsize


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(folder: Path, what: str = "run folder") -> None:
    """Raise :class:`RunFolderError` unless files can be created in ``folder`` (or, if it does not
    exist yet, in the nearest existing parent, where it will be created). Tried for real: permission
    bits say nothing about read-only mounts, root squash or ACLs."""
    probe_in = _existing(folder)
    try:
        if not probe_in.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(probe_in))
        with tempfile.NamedTemporaryFile(dir=probe_in, prefix=".unimrg-write-test-"):
            pass
    except OSError as e:
        where = folder if probe_in == Path(folder).absolute() else f"{probe_in} (to create {folder} in it)"
        raise RunFolderError(f"{what} {where} is not writable: {e.strerror or e}. Make it writable (or remount "
                             "it read-write), or choose another folder (--run-dir / run.dir)") from e


def describe_write_error(e: BaseException, writing: Path, folder: Path, latest: str | None) -> str | None:
    """What to tell the user when writing ``writing`` (under ``folder``) failed with ``e``; None if
    ``e`` is no OSError and the file system is neither full nor read-only (not a write failure).

    torch.save reports a full disk as a bare C++ error ("basic_ios::clear: iostream error",
    "unexpected pos 73728 vs 73622"), without errno; so the file system is asked."""
    code = getattr(e, "errno", None)
    resume = (f"the last complete checkpoint is {latest}; resume from it with run.resume=latest"
              if latest else "no complete checkpoint was written yet")
    try:
        free = free_bytes(folder)
    except OSError:
        free = None
    if code == errno.ENOSPC or code == errno.EDQUOT or (free is not None and free < FULL_BELOW):
        return (f"no space left on device while writing checkpoint {writing} ({_size(free)} free on the file "
                f"system of {folder}): free space there or lower train.keep_checkpoints; {resume}")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) or not os.access(_existing(writing), os.W_OK):
        return (f"cannot write checkpoint {writing}: {folder} is not writable ({e}). Make it writable (or "
                f"remount it read-write), or point run.dir at a writable folder; {resume}")
    if not isinstance(e, OSError):
        return None
    return f"writing checkpoint {writing} failed: {type(e).__name__}: {e}; {resume}"


def _size(n: int | None) -> str:
    if n is None:
        return "unknown space"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def remove_quietly(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
