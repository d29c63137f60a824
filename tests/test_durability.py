"""Durable results (issue 15): every damaged, full or unwritable file gives one clear line
or a correct recomputation, and nothing damaged is ever used.

Atomic writes (fsync, temporaries removed, a full disk in one line, stale temporaries
swept), trace checksums, recipe checks (keys given twice, grid-size limit, strategies
discovered once per grid) and `ouro-lab report` on damaged run folders. Faults come from
tests/faults.py: a monkeypatched ENOSPC, and a real tiny tmpfs where root may mount one."""

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sweep_helpers
import torch
from faults import disk_full, on_tiny_disk
from sweep_helpers import cli

from ouro_lab import files
from ouro_lab.files import DiskFullError, atomic_path, atomic_write, sweep_temporaries
from ouro_lab.recipe import RecipeError, load_recipe
from ouro_lab.trace import Trace, TraceDamagedError, random_signals

ROOT = Path(__file__).resolve().parents[1]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_fsyncs_the_file_before_and_the_folder_after_the_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("replace", str(b))),
                                                     real_replace(a, b))[1])
    target = tmp_path / "out.json"
    atomic_write(target, "{}")
    kinds = [c[0] for c in calls]
    assert kinds == ["fsync", "replace", "fsync"], calls
    assert calls[0][1].endswith(".tmp.json") and calls[2][1] == str(tmp_path)  # the file, then its folder
    assert target.read_text() == "{}" and leftovers(tmp_path) == []


def test_a_failed_or_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "t.csv"
    target.write_text("old\n")
    for exc in (ValueError("writer failed"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), atomic_path(target) as tmp:
            tmp.write_text("half a fi")
            raise exc
        assert target.read_text() == "old\n" and leftovers(tmp_path) == []


def test_disk_full_is_one_line_and_removes_the_temporary(tmp_path, monkeypatch):
    target = tmp_path / "report.html"
    target.write_text("old")
    hits = disk_full(monkeypatch, match="report.html")
    with pytest.raises(DiskFullError) as e:
        atomic_write(target, "x" * 10_000, what="the HTML report")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"disk full while writing {target} (the HTML report): ")
    assert " free on its disk; " in msg and "free some space and rerun" in msg
    assert hits == [target] and target.read_text() == "old" and leftovers(tmp_path) == []
    atomic_write(tmp_path / "other.txt", "fine")  # other names are not affected


def test_is_disk_full_reads_every_library_s_way_of_saying_it():
    assert files.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert files.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    rust = RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                        '"No space left on device" })')
    assert files.is_disk_full(rust)
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise ValueError("wrapped") from inner
    except ValueError as outer:
        assert files.is_disk_full(outer)
    assert not files.is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_stale_temporaries_of_dead_writers_are_swept_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "settings").mkdir()
        (tmp_path / "plots").mkdir()
        stale = [tmp_path / "settings" / f".abc.parquet.{dead.pid}.tmp",             # older sweep tables
                 tmp_path / f".report.html.{dead.pid}.tmp",
                 tmp_path / "plots" / f".acc.{dead.pid}.tmp.png",                      # older plots
                 tmp_path / f".metrics.csv.{dead.pid}.tmp.csv",                        # this version
                 tmp_path / f"trace-ab.safetensors.tmp{dead.pid}"]                     # older traces
        live = tmp_path / f".recipe.yaml.{alive.pid}.tmp.yaml"
        keep = [tmp_path / "metrics.csv", tmp_path / "settings" / "abc.parquet", tmp_path / ".lock"]
        for p in stale + [live] + keep:
            p.write_text("x")
        removed = sweep_temporaries(tmp_path)
        assert sorted(removed) == sorted(stale)
        assert live.exists() and all(p.exists() for p in keep)
        old = (tmp_path / f".x.json.{alive.pid}.tmp")  # a day old: its pid was reused by someone else
        old.write_text("x")
        os.utime(old, (0, 0))
        assert sweep_temporaries(tmp_path) == [old]
    finally:
        alive.kill()
        alive.wait()


TINY_DISK_WRITERS = textwrap.dedent("""
    import json, os, sys, torch, pandas as pd
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    from ouro_lab.files import DiskFullError, atomic_path, atomic_write
    from ouro_lab.trace import Trace, random_signals
    d = os.environ["DISK"]
    out = {}
    def attempt(name, fn):
        try:
            fn()
            out[name] = "written"
        except DiskFullError as e:
            out[name] = str(e)
    attempt("text", lambda: atomic_write(f"{d}/big.txt", "x" * 200_000))
    def parquet():
        with atomic_path(f"{d}/s.parquet") as tmp:
            pd.DataFrame({"a": torch.randn(100_000).numpy()}).to_parquet(tmp)
    attempt("parquet", parquet)
    n = 20_000
    tr = Trace(random_signals(4, n), torch.zeros(n, dtype=torch.long), torch.arange(n), torch.arange(n))
    attempt("trace", lambda: tr.save(f"{d}/cache/trace-x.safetensors"))
    def plot():
        from ouro_lab.plots import _save
        fig, ax = plt.subplots(figsize=(20, 20), dpi=200)
        ax.imshow(torch.rand(500, 500).numpy())
        _save(fig, f"{d}/plots/p.png")
    attempt("plot", plot)
    out["left"] = sorted(n for _, _, fs in os.walk(d) for n in fs)
    print(json.dumps(out))
""")


def test_a_real_full_disk_is_one_line_for_every_writer(tmp_path):
    """tables (pyarrow), traces (safetensors' Rust writer), plots (matplotlib), text."""
    (tmp_path / "w.py").write_text(TINY_DISK_WRITERS)
    r = on_tiny_disk(tmp_path / "disk", 96, f"cd {ROOT} && {sys.executable} {tmp_path / 'w.py'}",
                     env={"PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for name in ("text", "parquet", "trace", "plot"):
        assert out[name].startswith("disk full while writing "), (name, out[name])
        assert "free on its disk" in out[name] and "\n" not in out[name]
    assert out["left"] == []  # no temporary survives a failed write


# --------------------------------------------------------------------------- traces


def _trace(n=50):
    return Trace(random_signals(4, n, seed=1), torch.arange(n) // 10, torch.arange(n) % 10,
                 torch.arange(n) % 10 + 1, {"model": "m", "key": "k1"})


def _tensor_span(path: Path, name: str) -> tuple[int, int]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    a, b = json.loads(raw[8:8 + n])[name]["data_offsets"]
    return 8 + n + a, 8 + n + b


def test_a_trace_with_plausible_but_wrong_numbers_is_refused(tmp_path):
    path = _trace().save(tmp_path / "t.safetensors")
    assert Trace.load(path).meta["key"] == "k1"
    a, b = _tensor_span(path, "signal.exit_cdf")
    raw = bytearray(path.read_bytes())
    raw[a:b] = torch.full(((b - a) // 4,), 0.5).numpy().tobytes()  # valid floats, the file still parses
    path.write_bytes(bytes(raw))
    with pytest.raises(TraceDamagedError) as e:
        Trace.load(path)
    assert str(e.value) == (f"{path}: damaged trace: its content does not match the checksum stored with it; "
                            "delete it and rerun to recompute it")


def test_a_trace_with_edited_meta_or_cut_short_is_refused(tmp_path):
    path = _trace().save(tmp_path / "t.safetensors")
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b'\\"k1\\"', b'\\"k2\\"', 1))  # the key inside the header's meta JSON
    assert path.read_bytes() != raw
    with pytest.raises(TraceDamagedError, match="does not match the checksum"):
        Trace.load(path)
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(TraceDamagedError, match=r"t.safetensors: not a readable trace .*truncated or "
                                                r"damaged; delete it and rerun to recompute it"):
        Trace.load(path)


# --------------------------------------------------------------------------- recipes


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return sweep_helpers.lab(tmp_path_factory.getbasetemp() / "lab")


def _recipe(lab: Path, name: str, text: str) -> Path:
    p = lab / name
    p.write_text(text)
    return p


def test_a_key_given_twice_is_an_error_naming_both_lines(lab):
    f = _recipe(lab, "dup.yaml", textwrap.dedent("""\
        model:
          path: ckpt
          dtype: float32
          dtype: bfloat16
        tasks: {names: [tiny_mc], include: [tasks], limit: 4}
        strategies:
          - {name: threshold, grid: {q: 0.5, q: 0.7}}
        seed: 1
        seed: 2
        """))
    with pytest.raises(RecipeError) as e:
        load_recipe(f)
    assert e.value.errors == [f"{f}:4: model.dtype: key given twice (lines 3 and 4); keep one",
                              f"{f}:7: strategies[0].grid.q: key given twice (lines 7 and 7); keep one",
                              f"{f}:9: seed: key given twice (lines 8 and 9); keep one"]
    code, text = cli("validate", f)
    assert code == 2 and "Traceback" not in text and "model.dtype: key given twice (lines 3 and 4)" in text


GRID = """model: {{path: ckpt, dtype: float32, device: cpu, threads: 1}}
tasks: {{names: [tiny_mc], include: [tasks], limit: 4}}
strategies:
  - {{name: threshold, grid: {{q: {q}}}}}
  - {{name: kl, grid: {{eps: {eps}, min_step: {m}}}}}
"""


def test_a_grid_above_the_limit_is_refused_with_its_size_before_expanding(lab, monkeypatch):
    from ouro_lab import registry

    q = [round(i / 1000, 4) for i in range(1000)]
    f = _recipe(lab, "huge.yaml", GRID.format(q=q, eps=q, m=list(range(1000))))  # 1,000 + 1,000 x 1,000
    monkeypatch.setattr(registry, "expand_grid", lambda *a, **k: pytest.fail("expanded a refused grid"))
    with pytest.raises(RecipeError) as e:
        load_recipe(f)
    assert e.value.errors == [f"{f}:3: strategies: the grids expand to 1,001,000 settings, above the limit "
                              "of 100,000; shrink the grids, or raise the limit on purpose with "
                              "max_settings: 1001000 (or the override max_settings=1001000)"]
    monkeypatch.undo()
    small = _recipe(lab, "small.yaml", GRID.format(q=[0.1, 0.2], eps=[0.1, 0.2, 0.3], m=[1, 2]))  # 2 + 6
    with pytest.raises(RecipeError, match="the grids expand to 8 settings, above the limit of 7"):
        load_recipe(small, ["max_settings=7"])
    recipe, _ = load_recipe(small, ["max_settings=8"])
    assert recipe.max_settings == 8


def test_a_grid_discovers_and_imports_its_strategy_once(lab, monkeypatch):
    """10,000 settings validate in well under 2 s (bench/validate_grid.py measures it): the
    registry scans the strategy folders once per grid, not once per setting."""
    from ouro_lab import registry
    from ouro_lab.sweep import expand_settings

    q = [round(i / 2000, 5) for i in range(2000)]
    f = _recipe(lab, "wide.yaml", GRID.format(q=q, eps=[0.1], m=[1, 2]))
    calls = [0]
    real = registry.discover
    monkeypatch.setattr(registry, "discover", lambda *a, **k: (calls.__setitem__(0, calls[0] + 1),
                                                               real(*a, **k))[1])
    recipe, src = load_recipe(f)
    assert calls[0] <= 4  # the listing plus one per strategy entry
    calls[0] = 0
    settings = expand_settings(recipe, src)
    assert len(settings) == 4 + 2000 + 2 and calls[0] <= 2 + 4  # one per entry, one per fixed step


# --------------------------------------------------------------------------- ouro-lab report


@pytest.fixture(scope="module")
def run1(lab):
    return sweep_helpers.finished_run(lab)


@pytest.fixture
def run(run1, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run1, dst, ignore=shutil.ignore_patterns("settings", "plots"))
    return dst


def _cut_mid_row(p: Path):
    raw = p.read_bytes()
    p.write_bytes(raw[: raw.index(b"\n", len(raw) // 2) + 20])


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


DAMAGE = {
    "metrics-cut-mid-row": ("metrics.csv", _cut_mid_row, "cut off mid-row (its last line is incomplete)"),
    "metrics-empty": ("metrics.csv", lambda p: p.write_bytes(b""), "empty file"),
    "samples-truncated": ("samples.parquet", _truncate, "not a readable parquet file ("),
    "provenance-truncated": ("provenance.json", _truncate, "not valid JSON ("),
    "samples-missing": ("samples.parquet", Path.unlink, "missing (the per-document table"),
    "exits-cut-mid-row": ("exits.csv", _cut_mid_row, "cut off mid-row"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_report_refuses_a_damaged_or_incomplete_run_folder_in_one_line(run, case):
    name, damage, problem = DAMAGE[case]
    damage(run / name)
    code, text = cli("report", run)
    errors = [x for x in text.splitlines() if x.startswith("error:")]
    assert code == 2 and "Traceback" not in text and len(errors) == 1, text[-3000:]
    assert errors[0].startswith(f"error: {run / name}: {problem}"), errors[0]
    assert "rerun the sweep to rebuild it (`ouro-lab sweep " in errors[0] and f"--out {run}`" in errors[0]
    assert not (run / "plots").exists()  # refused before anything was drawn
