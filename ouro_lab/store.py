"""The run folder: where a sweep writes (checked first), its lock, finished settings, atomic tables.

    results/<recipe-stem>/<run-id>/     default_run_dir (run-id: a hash of the resolved recipe)
        .lock                           RunLock: one sweep per folder (`flock`, dropped on kill -9)
        settings/<key>.{parquet,json}   SettingStore: one pair per finished setting (json last)
        metrics.csv, samples.parquet... atomic_frame: a reader never sees half a table

Traces are cached apart, by content, under `cache_dir()`.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from ouro_lab.errors import OuroLabError
from ouro_lab.files import atomic_write
from ouro_lab.recipe import Recipe, RecipeSource, recipe_hash


class SweepError(OuroLabError):
    """A sweep that cannot start or go on (output folder, lock, resume mismatch)."""


def default_run_dir(recipe: Recipe, src: RecipeSource) -> Path:
    return Path("results") / src.file.stem / recipe_hash(recipe)


def check_writable(path: Path, what: str) -> None:
    """Create `path` if needed and prove a file can be written there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SweepError(f"{what}: {path}: output folder not writable ({e.strerror or e}); "
                         "choose another folder with --out") from None


class RunLock:
    """An exclusive `flock` on <run>/.lock: a second sweep on the folder fails at once
    with a clear message; the kernel drops the lock if the holder dies (kill -9)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.fh = None

    def __enter__(self):
        import fcntl

        self.fh = open(self.path, "a+")  # noqa: SIM115 (held for the whole sweep)
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "another process"
            self.fh.close()
            raise SweepError(f"{self.path.parent}: another sweep ({holder}) is writing to this folder; "
                             "wait for it to finish or use --out for a separate folder") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"pid {os.getpid()} on {platform.node()}\n")
        self.fh.flush()
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def atomic_frame(df, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if path.suffix == ".parquet":
        df.to_parquet(tmp, index=False)
    else:
        df.to_csv(tmp, index=False, float_format="%.10g")
    os.replace(tmp, path)


class SettingStore:
    """Finished settings, one `<key>.parquet` (samples) + `<key>.json` (metrics, exit
    counts) pair each; the JSON is written last and marks the setting done."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir / "settings"
        self.dir.mkdir(parents=True, exist_ok=True)

    def has(self, key: str) -> bool:
        return (self.dir / f"{key}.json").is_file() and (self.dir / f"{key}.parquet").is_file()

    def load(self, key: str):
        import pandas as pd

        rec = json.loads((self.dir / f"{key}.json").read_text())
        return rec, pd.read_parquet(self.dir / f"{key}.parquet")

    def save(self, key: str, rec: dict, samples) -> None:
        atomic_frame(samples, self.dir / f"{key}.parquet")
        atomic_write(self.dir / f"{key}.json", json.dumps(rec, sort_keys=True, default=jsonable))


def jsonable(x):
    """`json.dumps` default for what tables hold: numpy scalars as numbers, the rest as text."""
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    return str(x)


def cache_dir() -> Path:
    """Where traces are cached by content: $OURO_LAB_CACHE, else ~/.cache/ouro-lab/traces."""
    env = os.environ.get("OURO_LAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ouro-lab" / "traces"
