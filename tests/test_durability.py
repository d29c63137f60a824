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
    assert calls[0][1] == str(tmp_path / f".out.json.{os.getpid()}.tmp") and calls[2][1] == str(tmp_path)
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
                 tmp_path / f".metrics.csv.{dead.pid}.tmp",                            # this version
                 tmp_path / f"trace-ab.safetensors.tmp{dead.pid}"]                     # older traces
        live = tmp_path / f".recipe.yaml.{alive.pid}.tmp"
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


def test_a_trace_without_a_checksum_is_not_trusted(tmp_path):
    from safetensors.torch import save_file

    tr = _trace()
    tensors = {f"signal.{k}": v.contiguous() for k, v in tr.signals.items()} | {
        "request": tr.request, "position": tr.position, "ctx": tr.ctx}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"format": "ouro-lab-trace", "meta": "{}"})
    with pytest.raises(TraceDamagedError, match="without a content checksum"):
        Trace.load(tmp_path / "old.safetensors")


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


def _keep_rows(p: Path, n: int = 8):  # whole lines: only the checksum can tell
    p.write_text("".join(p.read_text().splitlines(True)[: n + 1]))


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


DAMAGE = {
    "metrics-cut-mid-row": ("metrics.csv", _cut_mid_row, "cut off mid-row (its last line is incomplete)"),
    "metrics-empty": ("metrics.csv", lambda p: p.write_bytes(b""), "empty file"),
    "samples-truncated": ("samples.parquet", _truncate, "not a readable parquet file ("),
    "provenance-truncated": ("provenance.json", _truncate, "not valid JSON ("),
    "samples-missing": ("samples.parquet", Path.unlink, "missing (the per-document table"),
    "exits-cut-mid-row": ("exits.csv", _cut_mid_row, "cut off mid-row"),
    "metrics-rows-dropped": ("metrics.csv", _keep_rows, "does not match the checksum provenance.json"),
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


def test_the_rebuild_hint_is_the_command_that_made_the_run(run):
    """Overrides are part of the stored settings' keys: the hint repeats them (it dropped
    `--limit 24 bootstrap=200`, so following it recomputed everything), writing to the folder
    the report was asked about (a moved or copied run: not the original --out)."""
    import json

    prov = json.loads((run / "provenance.json").read_text())
    prov.update(argv=["sweep", "r.yaml", "--limit", "24", "bootstrap=200", "--out", "my run"], cwd="/lab")
    (run / "provenance.json").write_text(json.dumps(prov))
    (run / "exits.csv").unlink()
    code, text = cli("report", run)
    errors = [x for x in text.splitlines() if x.startswith("error:")]
    assert code == 2 and len(errors) == 1
    hint = f"(`ouro-lab sweep r.yaml --limit 24 bootstrap=200 --out {run.resolve()}` in /lab: finished"
    assert hint + " settings are reused)" in errors[0]


# --------------------------------------------------------------------------- the sweep


MC_ONLY = """model: {path: ckpt, dtype: float32, device: cpu, threads: 1}
tasks: {names: [tiny_mc], include: [tasks], limit: 8}
strategies:
  - {name: threshold, grid: {q: [0.3, 0.9]}}
bootstrap: 50
batch_size: 16
"""


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """An empty trace cache of the test's own (damaging it touches no other test, and what
    it holds does not depend on which tests ran before)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("OURO_LAB_CACHE", str(cache))
    return cache


def _lines(text: str, start: str) -> list[str]:
    return [x for x in text.splitlines() if x.startswith(start)]


def _overwrite_cdf(path: Path):
    a, b = _tensor_span(path, "signal.exit_cdf")
    raw = bytearray(path.read_bytes())
    raw[a:b] = torch.full(((b - a) // 4,), 0.5).numpy().tobytes()
    path.write_bytes(bytes(raw))


def test_a_damaged_cached_trace_is_recomputed_and_overwritten_never_used(lab, own_cache, tmp_path):
    import pandas as pd

    f = _recipe(lab, "mc_only.yaml", MC_ONLY)
    code, text = cli("sweep", f, "--out", tmp_path / "first")  # traces what this recipe needs, once
    assert code == 0 and "computed trace" in text, text[-2000:]
    (trace_file,) = own_cache.glob("trace-*.safetensors")
    code, text = cli("sweep", f, "--out", tmp_path / "clean")
    assert code == 0 and "reused cached trace" in text, text[-2000:]
    clean = sweep_helpers.untimed(tmp_path / "clean" / "metrics.csv")
    for damage, problem in ((_overwrite_cdf, "damaged trace: its content does not match the checksum"),
                            (_truncate, "not a readable trace (")):
        damage(trace_file)
        code, text = cli("sweep", f, "--out", tmp_path / "again")
        assert code == 0 and "Traceback" not in text, text[-2000:]
        said = _lines(text, f"cached trace {trace_file}: ")
        assert len(said) == 1 and problem in said[0], text[-2000:]
        assert said[0].endswith("; recomputing it (the file will be overwritten)")
        assert "computed trace" in text and "reused cached trace" not in text
        Trace.load(trace_file)  # overwritten with a good trace
        pd.testing.assert_frame_equal(sweep_helpers.untimed(tmp_path / "again" / "metrics.csv"), clean)
    code, text = cli("sweep", f, "--out", tmp_path / "again")  # and the next run reuses it
    assert code == 0 and "reused cached trace" in text and "cached trace " + str(trace_file) not in text


def _settings_files(run: Path) -> list[Path]:
    return sorted((run / "settings").glob("*.json"))


def _edit_a_value(p: Path):
    doc = json.loads(p.read_text())
    doc["record"]["metrics"][0]["value"] += 0.25
    p.write_text(json.dumps(doc))


STORE_DAMAGE = [  # (what is damaged, how, the problem said)
    ("json", lambda p: p.write_text(p.read_text()[:40]), "not valid JSON"),                  # half written
    ("json", lambda p: p.write_bytes(b""), "empty file"),
    ("json", _edit_a_value, "its record does not match the checksum stored with it"),
    ("json", lambda p: p.write_text(json.dumps(json.loads(p.read_text())["record"])),        # older format
     "not a stored setting of this ouro-lab version"),
    ("parquet", _truncate, "does not match the checksum in"),
    ("parquet", lambda p: p.write_bytes(p.read_bytes()[:8] + b"garbled" * 50), "does not match the checksum"),
]


def test_damaged_stored_settings_are_said_in_one_line_and_redone(lab, run1, tmp_path):
    import pandas as pd

    run = tmp_path / "run"
    shutil.copytree(run1, run)
    files_ = _settings_files(run)
    damaged = []
    for (kind, damage, problem), j in zip(STORE_DAMAGE, files_, strict=False):
        target = j if kind == "json" else j.with_suffix(".parquet")
        damage(target)
        damaged.append((target, problem))
    a, b = files_[-1].with_suffix(".parquet"), files_[-2].with_suffix(".parquet")  # another setting's file
    shutil.copyfile(b, a)
    damaged.append((a, "does not match the checksum in"))
    shutil.copyfile(files_[-4], files_[-3])  # another setting's json under this one's name
    damaged.append((files_[-3], "(a swapped file)"))
    code, text = cli("sweep", lab / "r.yaml", "--out", run)
    assert code == 0 and "Traceback" not in text, text[-3000:]
    redone = [x for x in text.splitlines() if "; redoing setting " in x]
    assert len(redone) == len(damaged), redone
    for target, problem in damaged:
        said = [x for x in redone if x.startswith(f"{target}: ")]
        assert len(said) == 1 and problem in said[0], (target, redone)
    pd.testing.assert_frame_equal(sweep_helpers.untimed(run / "metrics.csv"),
                                  sweep_helpers.untimed(run1 / "metrics.csv"))
    code, text = cli("sweep", lab / "r.yaml", "--out", run)  # all good again: nothing redone
    assert code == 0 and "redoing" not in text


@pytest.mark.parametrize("target", ["*.parquet", "recipe.yaml", "metrics.csv", "*.png", "report.html"])
def test_a_full_disk_anywhere_in_the_sweep_is_one_line_and_the_rerun_resumes(lab, run1, tmp_path, monkeypatch,
                                                                            target):
    import pandas as pd

    run = tmp_path / "run"
    if target != "*.parquet":  # the tables, plots and report come after every setting
        shutil.copytree(run1, run)
        for p in ("metrics.csv", "report.html", "plots"):
            shutil.rmtree(run / p) if (run / p).is_dir() else (run / p).unlink()
    hits = disk_full(monkeypatch, match=target, after=2 if target == "*.parquet" else 0)
    code, text = cli("sweep", lab / "r.yaml", "--out", run)
    errors = _lines(text, "error: ")
    assert code == 2 and "Traceback" not in text and len(errors) == 1, text[-3000:]
    done = len(_settings_files(run))
    assert errors[0].startswith(f"error: disk full while writing {hits[0]}")
    assert f" free on its disk; {done} finished setting(s) are kept in {run / 'settings'}; free some space " \
           "and rerun the same command to resume" in errors[0]
    if target == "*.parquet":
        assert done == 2 and "(setting fixed(step=3), replay)" in errors[0]
    assert leftovers(run) == []
    if target not in ("*.parquet", "report.html"):
        return  # resuming is checked after the first and the last write
    monkeypatch.undo()
    code, text = cli("sweep", lab / "r.yaml", "--out", run)
    assert code == 0, text[-3000:]
    pd.testing.assert_frame_equal(sweep_helpers.untimed(run / "metrics.csv"),
                                  sweep_helpers.untimed(run1 / "metrics.csv"))


def test_stale_temporaries_of_a_killed_run_are_removed_at_the_next_start(lab, run1, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    shutil.copytree(run1, run)
    stale = [run / "settings" / f".x.parquet.{dead.pid}.tmp", run / f".report.html.{dead.pid}.tmp",
             run / f".recipe.yaml.{dead.pid}.tmp", run / "plots" / f".acc.{dead.pid}.tmp.png"]
    for p in stale:
        p.write_text("partial")
    code, text = cli("sweep", lab / "r.yaml", "--out", run)
    assert code == 0, text[-2000:]
    assert f"{run}: removed 4 temporary file(s) left by an interrupted run" in text
    assert not any(p.exists() for p in stale)


def test_a_trace_that_cannot_be_cached_is_said_and_the_sweep_goes_on(lab, tmp_path, monkeypatch):
    import pandas as pd

    monkeypatch.setenv("OURO_LAB_CACHE", str(tmp_path / "empty-cache"))
    disk_full(monkeypatch, match="trace-*.safetensors")
    f = _recipe(lab, "mc_only.yaml", MC_ONLY)
    code, text = cli("sweep", f, "--out", tmp_path / "run")
    assert code == 0, text[-2000:]
    said = _lines(text, f"trace cache {tmp_path / 'empty-cache'}: could not write trace-")
    assert len(said) == 1 and "(disk full (" in said[0] and said[0].endswith(
        "going on without caching this trace (the next run computes it again)")
    assert list((tmp_path / "empty-cache").iterdir()) == []
    assert len(pd.read_csv(tmp_path / "run" / "metrics.csv"))
    code, text = cli("sweep", f, "--out", tmp_path / "run2", "--require-cache")
    errors = _lines(text, "error: ")
    assert code == 2 and len(errors) == 1 and "(required by --require-cache)" in errors[0], text[-2000:]


def _unwritable_caches(tmp_path: Path) -> dict:
    (tmp_path / "a-file").write_text("x")
    cases = {"a file in the path": ({"OURO_LAB_CACHE": str(tmp_path / "a-file" / "cache")},
                                    f"{tmp_path / 'a-file'} is a file, not a folder"),
             "no home": ({"OURO_LAB_CACHE": None, "HOME": None},
                         "no home folder to put it in (HOME is not set")}
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o500)
    if not os.access(ro, os.W_OK):  # root writes anyway: the read-only disk case covers it below
        cases["permission denied"] = ({"OURO_LAB_CACHE": str(ro / "cache")}, "is not writable")
    return cases


def test_an_unwritable_cache_is_found_before_the_trace_pass(lab, tmp_path, monkeypatch):
    import pwd

    import pandas as pd

    f = _recipe(lab, "mc_only.yaml", MC_ONLY)
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: (_ for _ in ()).throw(KeyError(uid)))  # no home at all
    for i, (case, (env, problem)) in enumerate(_unwritable_caches(tmp_path).items()):
        for k, v in env.items():
            monkeypatch.delenv(k, raising=False) if v is None else monkeypatch.setenv(k, v)
        code, text = cli("sweep", f, "--out", tmp_path / f"req{i}", "--require-cache")
        errors = _lines(text, "error: ")
        assert code == 2 and len(errors) == 1 and problem in errors[0], (case, text[-2000:])
        assert "(the cache is required by --require-cache)" in errors[0]
        assert not (tmp_path / f"req{i}" / "settings").exists()  # stopped before any pass
        if i:
            continue  # one full run without a cache is enough
        code, text = cli("sweep", f, "--out", tmp_path / "nocache")
        assert code == 0, text[-2000:]
        lines = text.splitlines()
        said = [n for n, x in enumerate(lines)
                if x.startswith("trace cache ") and "running without caching" in x]
        traced = [n for n, x in enumerate(lines) if x.startswith("trace pass: computed trace")]
        assert len(said) == 1 and problem in lines[said[0]] and traced and said[0] < traced[0], text[-2000:]
        m = pd.read_csv(tmp_path / "nocache" / "metrics.csv")
        assert set(m.strategy) == {"fixed", "threshold"}


def test_a_read_only_cache_disk_is_found(tmp_path):
    r = on_tiny_disk(tmp_path / "disk", 64, f"mount -o remount,ro $DISK && cd {ROOT} && {sys.executable} -c "
                     "'from pathlib import Path; from ouro_lab.store import cache_problem; import os; "
                     "print(cache_problem(Path(os.environ[\"DISK\"]) / \"traces\"))'",
                     env={"PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("is on a read-only disk") or "not writable" in r.stdout, r.stdout


# --------------------------------------------------------------------------- validate = the sweep's checks


def test_validate_checks_the_output_folder_and_the_folds_as_the_sweep_does(lab, tmp_path):
    (tmp_path / "a-file").write_text("x")
    code, text = cli("validate", lab / "r.yaml", f"output={tmp_path / 'a-file' / 'run'}")
    errors = _lines(text, "error: ")
    assert code == 2 and len(errors) == 1, text[-2000:]
    bad = tmp_path / "a-file" / "run"
    file_ = tmp_path / "a-file"
    assert errors[0] == (f"error: {lab / 'r.yaml'}: override output={bad}: output: {bad}: output folder "
                         f"not writable ({file_} is a file, not a folder); choose another folder with --out")
    for cmd in (("validate", lab / "r.yaml"), ("sweep", lab / "r.yaml", "--out", tmp_path / "run")):
        code, text = cli(*cmd, "calibration.folds=9")
        errors = _lines(text, "error: ")
        assert code == 2 and len(errors) == 1, text[-2000:]
        assert errors[0] == (f"error: {lab / 'r.yaml'}: override calibration.folds=9: calibration.folds: 9 "
                             "folds, but task tiny_mc has 8 documents; use at most 8 folds, or more "
                             "documents (tasks.limit or tasks.sample)")
    assert not (tmp_path / "run" / "settings").exists()
    # no calibrating rule: a small run is fine (--limit 1 smoke runs), but its report makes no
    # cross-fitted choice on empty folds (five picks for three documents were shown)
    plain = tmp_path / "plain.yaml"
    plain.write_text(MC_ONLY.replace("ckpt", str(lab / "ckpt")).replace("[tasks]", f"[{lab / 'tasks'}]"))
    code, text = cli("sweep", plain, "calibration.folds=5", "tasks.limit=3", "--out", tmp_path / "few")
    assert code == 0, text[-2000:]
    from ouro_lab.stats import doc_folds

    empty = 5 - len(set(doc_folds(["tiny_mc"] * 3, range(3), 5, 0).tolist()))
    saved = json.loads((tmp_path / "few" / "summary.json").read_text())["tasks"]["tiny_mc"]["saved"]
    assert {r["crossfit"].get("refused") for r in saved if r["kind"] != "select"} == {
        f"{empty} of 5 calibration folds hold none of the 3 documents"}
    # folds are a seeded hash of each document: enough documents can still leave a fold empty
    # (all 4 of tiny_mc's first documents fall in one of 3 folds); a calibrating rule is refused
    folds = doc_folds(["tiny_mc"] * 4, range(4), 3, 0).tolist()
    assert len(set(folds)) < 3
    code, text = cli("validate", lab / "r.yaml", "calibration.folds=3", "tasks.limit=4")
    errors = _lines(text, "error: ")
    want = f"3 folds of task tiny_mc's 4 documents leave {3 - len(set(folds))} empty (calibration.seed 0)"
    assert code == 2 and len(errors) == 1 and want in errors[0], text


@pytest.mark.slow
def test_a_sweep_on_a_really_full_disk_stops_in_one_line_and_resumes_when_space_is_freed(lab, run1, tmp_path):
    """The whole sweep with its run folder on a tmpfs too small for it (root only)."""
    cmd = f"{sys.executable} -m ouro_lab.cli sweep {lab / 'r.yaml'} --out $DISK/run"
    script = (f"cd {ROOT}; {cmd} 2>$DISK/../err1; echo rc1=$?; find $DISK -name '*.tmp*' | wc -l; "
              f"mount -o remount,size=64m $DISK; {cmd} 2>$DISK/../err2; echo rc2=$?; "
              f"cp $DISK/run/metrics.csv $DISK/../metrics.csv")
    r = on_tiny_disk(tmp_path / "disk", 120, script, env={"PYTHONPATH": str(ROOT), "OURO_LAB_PROGRESS": "0"})
    out = r.stdout.split()
    assert "rc1=2" in out and "rc2=0" in out, (r.stdout, (tmp_path / "err1").read_text()[-2000:])
    assert out[out.index("rc1=2") + 1] == "0"  # no temporary left
    err1 = (tmp_path / "err1").read_text()
    errors = _lines(err1, "error: ")
    assert len(errors) == 1 and "Traceback" not in err1
    assert errors[0].startswith("error: disk full while writing ")
    assert "rerun the same command to resume" in errors[0]
    import pandas as pd

    pd.testing.assert_frame_equal(sweep_helpers.untimed(tmp_path / "metrics.csv"),
                                  sweep_helpers.untimed(run1 / "metrics.csv"))
