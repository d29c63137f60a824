"""`batch_size: auto`: the largest batch that fits on CUDA (found by trying), 8 elsewhere, logged."""

import pytest
import torch
from cli_helpers import run_cli
from harness_helpers import make_model_dir, make_tasks

from ouro_lab.lm import CPU_BATCH, HarnessError, largest_fitting, resolve_batch_size


def test_numbers_pass_and_auto_is_the_cpu_default(tiny_config):
    from ouro_lab.model import OuroForCausalLM

    model = OuroForCausalLM(tiny_config)
    said = []
    assert resolve_batch_size(5, model) == 5 == resolve_batch_size("5", model)
    assert resolve_batch_size("auto", model, log=said.append) == CPU_BATCH == 8
    assert said == ["batch_size auto: 8 on cpu (no memory probe off CUDA; give a number to change it)"]
    for bad in (0, "x", -2):
        with pytest.raises(HarnessError, match="positive integer or auto"):
            resolve_batch_size(bad, model)


@pytest.mark.parametrize("limit", [0, 1, 12, 33, 64, 500])
def test_largest_fitting_finds_the_edge(limit):
    tried = []

    def fits(n):
        tried.append(n)
        return n <= limit

    assert largest_fitting(fits, 64) == min(limit, 64)
    assert len(tried) <= 14  # halving then bisecting: ~2 log2(64) probes


def test_eval_logs_the_auto_batch(tmp_path, monkeypatch, capsys):
    model = make_model_dir(tmp_path / "m")
    make_tasks(tmp_path / "t", n=4)
    r = run_cli(monkeypatch, capsys, "eval", model, "--tasks", "tiny_mc", "--include-path", tmp_path / "t",
                "--batch-size", "auto")
    assert r.returncode == 0, r.stderr
    assert "batch_size auto: 8 on cpu" in r.stderr


@pytest.mark.gpu
def test_auto_batch_on_cuda_fits(tiny_config):
    from ouro_lab.model import OuroForCausalLM

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = OuroForCausalLM(tiny_config).cuda()
    said = []
    n = resolve_batch_size("auto", model, max_length=128, max_batch=16, log=said.append)
    assert n == 16 and "fits on cuda" in said[0]  # a tiny model: the cap fits
