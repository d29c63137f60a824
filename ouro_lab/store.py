"""The run folder: where a sweep writes (checked first), its lock, finished settings, atomic tables.

    results/<recipe-stem>/<run-id>/     default_run_dir (run-id: a hash of the resolved recipe)
        .lock                           RunLock: one sweep per folder (`flock`, dropped on kill -9)
        settings/<key>.{parquet,json}   SettingStore: one pair per finished setting (json last,
                                        with the checksums of both: checked on every load)
        metrics.csv, samples.parquet... atomic_frame: a reader never sees half a table

Traces are cached apart, by content, under `cache_dir()` (`trace_cache` checks it first).
`git_sha()` and `versions()` are what provenance.json records of the code that ran;
`timing_context(model)`, where live settings are timed (part of their keys).
Every write is durable (`ouro_lab.files`): fsynced, renamed into place, its temporary
removed on failure; a full disk is one `DiskFullError` line.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
from pathlib import Path

from ouro_lab.errors import OuroLabError
from ouro_lab.files import (
    DamagedFileError,
    DiskFullError,
    atomic_path,
    atomic_write,
    digest,
    file_digest,
    folder_problem,
    is_disk_full,
    read_json,
    read_parquet,
    sweep_temporaries,
)
from ouro_lab.recipe import Recipe, RecipeSource, canonical, recipe_hash


class SweepError(OuroLabError):
    """A sweep that cannot start or go on (output folder, lock, resume mismatch)."""


def default_run_dir(recipe: Recipe, src: RecipeSource) -> Path:
    return Path("results") / src.file.stem / recipe_hash(recipe)


def run_dir_for(recipe: Recipe, src: RecipeSource, out) -> tuple[Path, str]:
    """The run folder (`--out`, else the recipe's `output`, else the default) and where it
    was chosen, for messages."""
    if out is not None:
        return Path(out), "--out"
    if recipe.output:
        return Path(recipe.output), src.where(("output",)) + ": output"
    return default_run_dir(recipe, src), f"{src.file}: output (default results/)"


def check_output(path: Path, what: str) -> None:
    """`check_writable` without creating anything (for `validate` and `--dry-run`)."""
    problem = folder_problem(path)
    if problem:
        raise SweepError(f"{what}: {path}: output folder not writable ({problem}); choose another folder "
                         "with --out")


def _flat(d, at: str = "") -> dict:
    """Dotted paths to values: through mappings, and through lists of mappings by index
    (strategies.0.grid.q); a list of plain values is one value."""
    if isinstance(d, list) and any(isinstance(x, dict) for x in d):
        d = {str(i): x for i, x in enumerate(d)}
    if not isinstance(d, dict):
        return {at: d}
    return {k: v for key, sub in d.items() for k, v in _flat(sub, f"{at}.{key}" if at else str(key)).items()}


def stray_samples(run_dir: Path, kept: set, console=None) -> list[str]:
    """Sample folders under `run_dir/samples` that belong to no setting of this run (left by
    an unfinished run of another recipe resumed here): kept, never deleted, but said (one
    line) and listed, since metrics.csv does not hold them."""
    root = run_dir / "samples"
    found = sorted(str(d.relative_to(root)) for d in root.glob("*/*") if d.is_dir() and d not in kept)
    if found and console is not None:
        from ouro_lab.progress import log

        log(console, f"samples/: {len(found)} folder(s) of settings not in this run, left by an earlier run "
                     f"into this folder and not in metrics.csv: {', '.join(found[:3])}"
                     + (f" and {len(found) - 3} more" if len(found) > 3 else ""))
    return found


def check_same_recipe(path: Path, recipe: Recipe, what: str) -> None:
    """A folder that holds a finished run (its provenance.json) of another recipe is not
    replaced: one line naming what differs. An unfinished one resumes (its stored
    settings are keyed by what they were computed from)."""
    prov = path / "provenance.json"
    try:
        if not prov.is_file():
            return
    except OSError as e:  # e.g. a name too long for the file system
        raise SweepError(f"{what}: {path}: not usable as an output folder ({e.strerror or e}); choose "
                         "another folder with --out") from None
    try:
        old = json.loads(prov.read_text())
    except (OSError, ValueError):
        return  # damaged: the sweep rewrites it (see read_run's checks)
    if not isinstance(old, dict) or old.get("recipe_hash") in (None, recipe_hash(recipe)):
        return
    a, b = _flat(old.get("recipe") or {}), _flat(canonical(recipe))

    def short(v) -> str:
        r = json.dumps(v, default=str)
        return r if len(r) <= 40 else r[:37] + "..."

    diff = [f"{k} {short(a.get(k))} -> {short(b.get(k))}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in ("output", "log_samples", "max_settings")]
    what_differs = "; ".join(diff[:3]) or "changed"
    more = f"; {len(diff) - 3} more" if len(diff) > 3 else ""
    raise SweepError(f"{what}: {path} holds a finished run of another recipe ({what_differs}{more}); choose "
                     f"another folder with --out, or delete {path} to replace it")


@contextlib.contextmanager
def resumable_on_full_disk(run_dir: Path):
    """A full disk inside (whichever library was writing) becomes one `DiskFullError` line
    saying how many finished settings are kept and to rerun to resume."""
    try:
        yield
    except Exception as e:
        if not is_disk_full(e):
            raise
        path = getattr(e, "path", None) or getattr(e, "filename", None) or run_dir
        done = len(list((run_dir / "settings").glob("*.json"))) if (run_dir / "settings").is_dir() else 0
        raise DiskFullError(path, getattr(e, "what", None),
                            hint=f"{done} finished setting(s) are kept in {run_dir / 'settings'}; free some "
                                 "space and rerun the same command to resume") from None


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


def atomic_frame(df, path: Path, what: str | None = None) -> None:
    with atomic_path(path, what) as tmp:
        if path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False, float_format="%.10g")


STORE_FORMAT = 2  # 1: the bare record, no checksums (such files are redone, never trusted)


class SettingStore:
    """Finished settings, one `<key>.parquet` (samples) + `<key>.json` pair each. The JSON
    is written last and marks the setting done; it holds the record (metrics, exit counts),
    the key, the record's checksum and the parquet file's. `load` checks all of them: a
    file that is cut short, garbled, edited, or swapped for another setting's raises
    `DamagedFileError` (the sweep says so in one line and redoes the setting)."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir / "settings"
        self.dir.mkdir(parents=True, exist_ok=True)

    def has(self, key: str) -> bool:
        return (self.dir / f"{key}.json").is_file() and (self.dir / f"{key}.parquet").is_file()

    def load(self, key: str):
        """(record, samples) of a finished setting, both checked against the JSON's checksums."""
        jfile, pfile = self.dir / f"{key}.json", self.dir / f"{key}.parquet"
        doc = read_json(jfile)
        if not isinstance(doc, dict) or doc.get("format") != STORE_FORMAT:
            raise DamagedFileError(jfile, "not a stored setting of this ouro-lab version (no checksums)")
        if doc.get("key") != key:
            raise DamagedFileError(jfile, f"holds setting {doc.get('key')!r}, not {key!r} (a swapped file)")
        rec = doc.get("record")
        if not isinstance(rec, dict) or digest(_canonical(rec)) != doc.get("record_checksum"):
            raise DamagedFileError(jfile, "its record does not match the checksum stored with it (edited or "
                                   "damaged)")
        if file_digest(pfile) != doc.get("samples_checksum"):
            raise DamagedFileError(pfile, f"does not match the checksum in {jfile.name} (damaged, or another "
                                   "setting's file)")
        return rec, read_parquet(pfile)

    def save(self, key: str, rec: dict, samples, what: str | None = None) -> None:
        pfile = self.dir / f"{key}.parquet"
        atomic_frame(samples, pfile, what)
        rec = json.loads(_canonical(rec))  # the record as it will be read back
        doc = {"format": STORE_FORMAT, "key": key, "record": rec, "record_checksum": digest(_canonical(rec)),
               "samples_checksum": file_digest(pfile)}
        atomic_write(self.dir / f"{key}.json", json.dumps(doc, sort_keys=True), what)


def _canonical(rec) -> bytes:
    return json.dumps(rec, sort_keys=True, default=jsonable).encode()


# --------------------------------------------------------------------------- provenance


def git_sha() -> str | None:
    """The commit of ouro-lab's own checkout (None when installed from a package: the
    repository around site-packages, e.g. a user's project, is not ouro-lab's)."""
    root = Path(__file__).resolve().parent.parent
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=10)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
            return None
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def timing_context(model) -> dict:
    """What a live setting's measured seconds depend on beyond the recipe: the resolved
    device and its name, torch's threads, and the host."""
    import torch

    dev = model.device
    name = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else platform.processor() or platform.machine())
    return {"device": str(dev), "device_name": name, "threads": torch.get_num_threads(),
            "host": platform.node()}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("ouro-lab", "torch", "lm_eval", "transformers", "datasets", "numpy", "pandas", "pydantic",
                "matplotlib"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def jsonable(x):
    """`json.dumps` default for what tables hold: numpy scalars as numbers, the rest as text."""
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    return str(x)


def cache_dir() -> Path:
    """Where traces are cached by content: $OURO_LAB_CACHE, else ~/.cache/ouro-lab/traces."""
    env = os.environ.get("OURO_LAB_CACHE")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("HOME") or _passwd_home()  # an empty HOME is no home, not "/"
    return (Path(home) if home else Path("~")) / ".cache" / "ouro-lab" / "traces"


def _passwd_home() -> str | None:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_dir or None
    except (ImportError, KeyError):  # a container user without a password entry
        return None


def cache_problem(path: Path) -> str | None:
    """Why traces cannot be cached under `path` (None: they can). Creates the folder and
    writes a probe file, as a trace write would: read-only disks, a file in the path,
    permissions and a missing home folder are all found here, before any model pass."""
    if not path.is_absolute():
        return "no home folder to put it in (HOME is not set and this user has none)"
    problem = folder_problem(path)
    if problem:
        return problem
    try:
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / f".probe-{os.getpid()}", b"")
        (path / f".probe-{os.getpid()}").unlink()
    except DiskFullError:
        return "its disk is full"
    except OSError as e:
        return f"not writable ({e.strerror or e})"
    return None


def trace_cache(require: bool = False, log=None, path: Path | None = None) -> Path | None:
    """The trace cache folder (`path`, else `cache_dir()`), checked before any model pass:
    None (with one line to `log`) if traces cannot be cached there; with `require`, a
    `SweepError` at once instead. Stale temporaries of killed trace writers are removed."""
    path = Path(path).expanduser().absolute() if path is not None else cache_dir()
    problem = cache_problem(path)
    if problem is None:
        sweep_temporaries(path, recursive=False)
        return path
    if require:
        raise SweepError(f"trace cache {path}: {problem}; point OURO_LAB_CACHE to a writable folder (the "
                         "cache is required by --require-cache)")
    if log is not None:
        log(f"trace cache {path}: {problem}; running without caching (the trace pass reruns next time; set "
            "OURO_LAB_CACHE to a writable folder to keep traces)")
    return None
