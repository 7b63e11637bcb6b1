"""Atomic file writes: a killed process never leaves a half-written file under the final name.

The data goes to ``.<name>.<host>-<pid>.<random>.part`` beside the target and is renamed over it once complete
(``<host>``: 8 hex digits of the machine's name). A new file gets the mode the umask gives (``0o666 & ~umask``), a
replaced file keeps its mode. Temporary files of this pattern left by a writer of this machine that is no longer
alive (killed, say) are removed by the next write of the same target; a live writer's are never touched, nor are
another machine's (on a shared file system its PIDs say nothing here).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from segens.errors import SegensError

# Older temporaries have no "<host>-": they are taken as this machine's.
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?:(?P<host>[0-9a-f]{8})-)?(?P<pid>[0-9]+)\.[0-9a-f]{8}\.part")


def host_tag() -> str:
    """8 hex digits naming this machine (a digest of its host name), as embedded in temporary names."""
    return hashlib.sha256(socket.gethostname().encode("utf-8", "surrogatepass")).hexdigest()[:8]


MAX_STEM = 200
"""File names longer than this are shortened inside temporary names (a file system allows 255 bytes per name)."""


def _stem(name: str) -> str:
    """The target's name as a temporary name embeds it: itself, or when long a prefix and 8 hex digits of it."""
    if len(name.encode("utf-8", "surrogateescape")) <= MAX_STEM:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return name.encode("utf-8", "surrogateescape")[:MAX_STEM - 9].decode("utf-8", "ignore") + "~" + digest


def temporary_name(path: Path) -> Path:
    """A fresh temporary path beside ``path`` that embeds this machine's tag and this process's PID."""
    return path.with_name(f".{_stem(path.name)}.{host_tag()}-{os.getpid()}.{secrets.token_hex(4)}.part")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OverflowError:
        return False
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove ``.<name>.<host>-<pid>.<random>.part`` files beside ``path`` written on this machine by a process
    that is gone; the removed paths are returned. Anything else (a live writer's temporary, another machine's, a
    file of another pattern) is left alone."""
    path = Path(path)
    removed = []
    stem = _stem(path.name)
    try:
        candidates = list(path.parent.glob(f".{glob_escape(stem)}.*.part"))
    except OSError:
        return removed
    here = host_tag()
    for candidate in candidates:
        match = _TEMPORARY.fullmatch(candidate.name)
        if match is None or match["name"] != stem or match["host"] not in (None, here) \
                or _alive(int(match["pid"])):
            continue
        try:
            candidate.unlink()
            removed.append(candidate)
        except FileNotFoundError:  # another writer cleaned it up meanwhile
            pass
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _file_mode(path: Path) -> int | None:
    """The permission bits of an existing regular file at ``path`` (None where there is none)."""
    try:
        info = path.stat()
    except OSError:
        return None
    return stat.S_IMODE(info.st_mode) if stat.S_ISREG(info.st_mode) else None


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path`` (mode: the
    replaced file's, else what the umask gives). On any error the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    kept_mode = _file_mode(path)
    temporary = temporary_name(path)
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as exc:
        raise SegensError(f"{path}: cannot write beside it ({exc.strerror or exc}); check the folder's permissions "
                          "and free space, or write to another path") from None
    try:
        try:
            if kept_mode is not None:
                os.fchmod(descriptor, kept_mode)  # exactly the old mode, whatever the umask says
            handle = os.fdopen(descriptor, mode, encoding=None if "b" in mode else encoding,
                               newline=None if "b" in mode else "")
        except BaseException:
            os.close(descriptor)
            raise
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.replace(temporary, path)
        except OSError as exc:
            raise SegensError(f"{path}: cannot replace it ({exc.strerror or exc}: an immutable file, or a folder that "
                              "only allows appending?); nothing was written there") from None
    except BaseException as exc:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            if isinstance(exc, SegensError):  # say where the complete copy lies, rather than hide it
                raise SegensError(f"{exc} (its complete temporary copy {temporary.name} could not be removed "
                                  "either)") from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_write(path) as handle:
        handle.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)
