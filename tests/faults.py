"""Fault injection for the durability tests: a disk that fills up.

    hits = disk_full(monkeypatch, match="*.parquet", after=2)  # 3rd .parquet write on fails
    out = on_tiny_disk(tmp_path / "disk", 256, "python -m ouro_lab.cli sweep ...")

`disk_full` makes ouro-lab's atomic writes fail as a full disk does (the temporary is
written, then flushing it raises OSError ENOSPC). `on_tiny_disk` runs a shell script with
a real tmpfs of a few kB mounted at a folder, in a private mount namespace (nothing leaks
to the machine); it needs root and a kernel that allows it, and the tests that use it
skip, saying so, where it does not.
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

_TMP = re.compile(r"^\.(?P<name>.+)\.\d+\.tmp(\.[A-Za-z0-9]+)?$")


def disk_full(monkeypatch, match: str = "*", after: int = 0) -> list[Path]:
    """From the `after`+1-th atomic write of a file whose name matches `match` (fnmatch)
    on, the write fails with ENOSPC. Returns the list of targets that failed (it grows)."""
    from ouro_lab import files

    real = files._fsync
    seen, hits = [0], []

    def fsync(path, directory=False):
        m = None if directory else _TMP.match(Path(path).name)
        if m and fnmatch.fnmatch(m["name"], match):
            seen[0] += 1
            if seen[0] > after:
                hits.append(Path(path).with_name(m["name"]))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, directory)

    monkeypatch.setattr(files, "_fsync", fsync)
    return hits


@functools.cache
def tiny_disk_problem() -> str | None:
    """Why a tmpfs cannot be mounted here (None: it can)."""
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root to mount a tmpfs"
    if not shutil.which("unshare") or not shutil.which("mount"):
        return "needs unshare and mount"
    probe = Path("/tmp") / f"ouro-lab-tmpfs-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        r = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k none {probe}"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"unshare failed ({e})"
    finally:
        probe.rmdir()
    return None if r.returncode == 0 else f"mount not permitted ({r.stderr.strip()[:80]})"


def on_tiny_disk(mountpoint: Path, size_kb: int, script: str, timeout: float = 300,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `script` (sh) with a `size_kb` tmpfs at `mountpoint`, which is gone afterwards
    (copy out what the test must inspect). `$DISK` in the script is the mountpoint; grow the
    disk inside the script with `mount -o remount,size=NNk $DISK`. Skips the test where no
    tmpfs can be mounted."""
    problem = tiny_disk_problem()
    if problem:
        pytest.skip(f"tiny filesystem unavailable: {problem}")
    mountpoint.mkdir(parents=True, exist_ok=True)
    full = f"mount -t tmpfs -o size={size_kb}k none {mountpoint} || exit 97\n{script}"
    return subprocess.run(["unshare", "-m", "sh", "-c", full], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {}), "DISK": str(mountpoint)})
