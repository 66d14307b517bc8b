"""Files every stage writes: atomically (a temp file in the same folder, renamed into place) and readable by
everyone, and the sha256 that identifies a checkpoint or a data file. A write that the machine refuses (a
read-only folder, a full disk) is an OutputError naming the folder and what is wrong, never a traceback."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from gptcore.errors import UserError

FILE_MODE = 0o644  # mkstemp creates files private (0600); outputs are for every user and tool to read
TEMP_SUFFIX = ".tmp"


class OutputError(UserError, OSError):
    """An output that cannot be written, with the folder, the file and the reason (and the bytes, when full)."""


def free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def output_error(path: Path, error: OSError, needed: int | None = None, doing: str = "write") -> OutputError:
    """The one-line message for `error`, met while writing (or removing: `doing`) `path`."""
    folder, name = path.parent, path.name
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on the device" if error.errno == errno.ENOSPC else "the disk quota is exceeded"
        free = free_bytes(folder)
        if needed is not None and free is not None:
            return OutputError(f"{folder}: {what}: {name} needs {needed:,} bytes, {free:,} are free; free some space")
        return OutputError(f"{folder}: {what} writing {name}; free some space")
    if error.errno == errno.EROFS:
        reason = "the folder is on a read-only file system"
    elif error.errno in (errno.EACCES, errno.EPERM):
        reason = "permission denied: the folder is not writable by this user"
    else:
        reason = f"{error.strerror or error} ({errno.errorcode.get(error.errno, 'no errno')})"
    return OutputError(f"{folder}: cannot {doing} {name}: {reason}")


def atomic_write(path: str | Path, write: Callable[[str], None], size: Callable[[], int] | None = None) -> Path:
    """Call `write(tmp_path)`, flush it to disk and rename it onto `path`: a reader (or DVC) never sees a
    half-written file, and an interrupted write leaves the previous file intact. `size()` gives the bytes
    the file takes, asked only when the disk is full so the message can say how many are needed."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            raise output_error(path, e, size() if full and size else None) from e
        raise
    return path


def atomic_write_bytes(path: str | Path, payload: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(payload), size=lambda: len(payload))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(
        path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), size=lambda: len(text.encode("utf-8"))
    )


def partial_writes(path: str | Path) -> list[Path]:
    """The temp files of atomic writes to `path` that never finished (their process was killed mid-write)."""
    path = Path(path)
    # mkstemp's names: the prefix, 8 characters of [a-z0-9_], the suffix
    pattern = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX))
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name))


def remove(path: Path) -> None:
    """Delete a file; a folder that refuses it is an OutputError like any refused write."""
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        raise output_error(path, e, doing="remove") from e


def not_utf8(error: UnicodeDecodeError) -> str:
    """Where bytes that should be UTF-8 are not, for a message: `byte 0xe9 at byte offset 3 (invalid
    continuation byte)`."""
    return f"byte 0x{error.object[error.start]:02x} at byte offset {error.start} ({error.reason})"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
