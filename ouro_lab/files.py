"""Durable file writes: a reader never sees half a file, and a failed or interrupted write
never leaves one behind.

    with atomic_path(run / "metrics.csv") as tmp:   # any writer that takes a path
        frame.to_csv(tmp)
    atomic_write(run / "provenance.json", text)    # str or bytes

A write goes to a hidden temporary beside the target (`.<name>.<pid>.tmp`), which
is fsynced, renamed over the target, and the folder fsynced: after a power loss the target
holds the old content or the new, never an empty file. On any failure (Ctrl-C included)
the temporary is removed; a full disk becomes one `DiskFullError` line naming the file and
the free space. Temporaries left by a killed process are removed by `sweep_temporaries`.
And paths as messages show them (`display_path`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from ouro_lab.errors import OuroLabError

# ".<name>.<pid>.tmp" (this module), ".<stem>.<pid>.tmp.png" (older plots), "<name>.tmp<pid>" (older traces)
_TEMPORARY = (re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp(\.[A-Za-z0-9]+)?$"),
              re.compile(r"^(?P<name>.+)\.tmp(?P<pid>\d+)$"))
STALE_AFTER_S = 24 * 3600  # a temporary this old is stale even if its pid is alive again (reused)


class DiskFullError(OuroLabError):
    """No space left (or quota exceeded) while writing `path`; nothing under the final
    name was touched and the temporary was removed."""

    def __init__(self, path: str | Path, what: str | None = None, hint: str | None = None):
        self.path, self.what = Path(path), what
        self.free = free_space(self.path)
        self.hint = hint or "files already written are kept; free some space and rerun the command"
        super().__init__(self.message())

    def message(self) -> str:
        what = f" ({self.what})" if self.what else ""
        return (f"disk full while writing {self.path}{what}: {human_bytes(self.free)} free on its disk; "
                f"{self.hint}")


class DamagedFileError(OuroLabError):
    """A file that exists but cannot be what was written: empty, cut short, not parseable,
    or not matching its recorded checksum. `problem` says which; callers add the fix."""

    def __init__(self, path: str | Path, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}")


def is_disk_full(e: BaseException | None) -> bool:
    """Whether `e` (or what caused it) is a full disk or an exceeded quota, whatever the
    library that raised it (OSError 28, pyarrow's OSError text, safetensors' Rust error)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, DiskFullError) or isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text or "os error 28" in text:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def free_space(path: str | Path) -> int | None:
    """Bytes free on the disk holding `path` (its nearest existing folder), None if unknown."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def human_bytes(n: int | None) -> str:
    if n is None:
        return "unknown space"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def temporary(path: str | Path) -> Path:
    """The hidden temporary a write of `path` goes through. It ends in `.tmp`, so that no
    glob for the target's kind (`settings/*.json`) ever sees it; writers that infer the
    format from the name (matplotlib) must be told it (`format="png"`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if not directory or e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise  # some filesystems cannot fsync a folder: the rename is then as durable as it gets
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, what: str | None = None) -> Iterator[Path]:
    """Yield a temporary path to write `path` through; on success it replaces `path`
    durably, on failure it is removed. A full disk raises `DiskFullError` (`what` says,
    in words, what was being written)."""
    path = Path(path)
    tmp = temporary(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent, directory=True)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if is_disk_full(e):
            raise DiskFullError(path, what) from None
        raise


def atomic_write(path: str | Path, data: str | bytes, what: str | None = None) -> Path:
    """Write `data` (text as UTF-8) to `path` atomically and durably."""
    path = Path(path)
    with atomic_path(path, what) as tmp, open(tmp, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
    return path


def display_path(path: str | Path) -> str:
    """A path as messages show it: relative to the working directory when below it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return rel if not rel.startswith("..") else str(path)


# --------------------------------------------------------------------------- checked reads


def digest(data: bytes) -> str:
    """The content checksum stored beside files ouro-lab checks on load."""
    return "blake2b-128:" + hashlib.blake2b(data, digest_size=16).hexdigest()


def file_digest(path: str | Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "blake2b-128:" + h.hexdigest()


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0]}" if s else type(e).__name__


def read_json(path: str | Path):
    """The JSON value in `path`; `DamagedFileError` if it is empty, cut short or garbled."""
    path = Path(path)
    data = path.read_bytes()
    if not data.strip():
        raise DamagedFileError(path, "empty file")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedFileError(path, f"not valid JSON ({_first_line(e)}): truncated or damaged") from None


def read_csv(path: str | Path, columns=(), **kw):
    """A pandas frame from a CSV pandas wrote; `DamagedFileError` if it is empty, cut off
    mid-row (pandas ends every file with a newline), unparseable, or lacks `columns`."""
    import pandas as pd

    path = Path(path)
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
    if not size:
        raise DamagedFileError(path, "empty file")
    if last != b"\n":
        raise DamagedFileError(path, "cut off mid-row (its last line is incomplete)")
    try:
        df = pd.read_csv(path, **kw)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DamagedFileError(path, f"not a readable CSV table ({_first_line(e)})") from None
    _has_columns(path, df, columns)
    return df


def read_parquet(path: str | Path, columns=()):
    """A pandas frame from a parquet file; `DamagedFileError` if it is truncated, garbled or
    lacks `columns` (pyarrow's ArrowInvalid / thrift errors become one line)."""
    import pandas as pd

    path = Path(path)
    if not path.stat().st_size:
        raise DamagedFileError(path, "empty file")
    try:
        df = pd.read_parquet(path)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 (pyarrow raises ArrowInvalid, OSError, ValueError, ...)
        raise DamagedFileError(path, f"not a readable parquet file ({_first_line(e)}): truncated or "
                               "damaged") from None
    _has_columns(path, df, columns)
    return df


def _has_columns(path: Path, df, columns) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DamagedFileError(path, f"missing column(s) {', '.join(missing)}: not the table ouro-lab wrote")


# --------------------------------------------------------------------------- stale temporaries


def sweep_temporaries(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Remove the temporaries a killed process left in `folder` (a temporary whose writer
    is not running, or older than a day); a live writer's are kept. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed, now = [], time.time()
    for p in folder.rglob("*") if recursive else folder.iterdir():
        m = next((m for rx in _TEMPORARY if (m := rx.match(p.name))), None)
        if m is None or not p.is_file():
            continue
        pid = int(m["pid"])
        try:
            old = now - p.stat().st_mtime > STALE_AFTER_S
        except OSError:
            continue
        if pid != os.getpid() and (old or not _running(pid)):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except (OverflowError, OSError):
        return False
    return True


def folder_problem(path: str | Path) -> str | None:
    """Why files could not be written under folder `path` (created if missing), or None.
    Creates nothing: the nearest existing folder must be writable, and a path that exists
    must be a writable folder."""
    p = Path(path)
    probe = p
    while not probe.exists():
        if probe == probe.parent:
            return "no existing parent folder"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable (permissions or a read-only disk)"
    with contextlib.suppress(OSError):  # os.access ignores read-only mounts: ask statvfs
        if os.statvfs(probe).f_flag & getattr(os, "ST_RDONLY", 1):
            return f"{probe} is on a read-only disk"
    return None


__all__ = ["atomic_path", "atomic_write", "display_path", "DiskFullError", "DamagedFileError", "is_disk_full",
           "free_space", "sweep_temporaries", "folder_problem", "temporary", "human_bytes", "digest",
           "file_digest", "read_json", "read_csv", "read_parquet"]
