"""Step traces: step_signals against a brute-force full-vocabulary computation, the
trace file round trip and key, and `ouro-lab trace` end to end."""

import json
import math
from pathlib import Path

import pytest
import torch
from cli_helpers import cli, run_cli

from ouro_lab.errors import OuroLabError
from ouro_lab.model import OuroForCausalLM, exit_distribution, init_weights
from ouro_lab.strategy import SIGNALS, replay
from ouro_lab.trace import Trace, TraceError, random_signals, step_signals, trace_text

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tiny_config):
    torch.manual_seed(0)
    return init_weights(OuroForCausalLM(tiny_config), std=0.3, seed=0).eval()


def brute_force(out, targets, mask):
    """Every signal from the full (R, B, T, V) logits, in float64."""
    logits = out.all_logits().double()[:, mask]                # (R, N, V)
    logp = logits.log_softmax(-1)
    p = logp.exp()
    tgt = targets[mask]
    top2 = p.topk(2, dim=-1).values
    h = out.step_hidden.double()[:, mask]
    inf = torch.full((1, h.shape[1]), math.inf, dtype=torch.float64)
    pdf, cdf = exit_distribution(out.gate_logits[:, mask])
    known = tgt >= 0
    tlp = logp.gather(-1, tgt.clamp(min=0)[None, :, None].expand(logp.shape[0], -1, 1))[..., 0]
    return {
        "gate_logit": out.gate_logits[:, mask], "exit_pdf": pdf, "exit_cdf": cdf,
        "hidden_delta": torch.cat((inf, (h[1:] - h[:-1]).norm(dim=-1) / h[1:].norm(dim=-1))),
        "argmax": logits.argmax(-1), "entropy": -(p * logp).sum(-1), "max_prob": top2[..., 0],
        "margin": top2[..., 0] - top2[..., 1],
        "kl_prev": torch.cat((inf, (p[1:] * (logp[1:] - logp[:-1])).sum(-1))),
        "target_logprob": torch.where(known, tlp, torch.nan),
        "target_is_argmax": known & (logits.argmax(-1) == tgt),
    }


@pytest.mark.parametrize("chunk_tokens", [3, 1000])  # several LM-head chunks, and one
def test_step_signals_match_brute_force(tiny, chunk_tokens):
    B, T, V = 2, 9, tiny.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(V, (B, T), generator=g)
    targets = torch.randint(V, (B, T), generator=g)
    targets[1, 4] = -1  # unknown target
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :3] = False
    mask[1, 7] = False
    with torch.no_grad():
        out = tiny(ids)
        got = step_signals(tiny, out, targets, mask, chunk_elements=chunk_tokens * V)
        want = brute_force(out, targets, mask)
    N = int(mask.sum())
    assert set(got) == set(SIGNALS)
    for k, v in got.items():
        assert v.shape == (4, N), k
        if k == "argmax":
            assert v.dtype == torch.long and torch.equal(v, want[k]), k
        elif k == "target_is_argmax":
            assert v.dtype == torch.bool and torch.equal(v, want[k]), k
        else:
            assert v.dtype == torch.float32, k
            torch.testing.assert_close(v.double(), want[k].double(), atol=2e-5, rtol=2e-5, equal_nan=True,
                                       msg=k)
    assert torch.isinf(got["kl_prev"][0]).all() and torch.isinf(got["hidden_delta"][0]).all()
    unknown = int(mask[0].sum()) + 4  # row 1, position 4 (row-major order of the mask)
    assert torch.isnan(got["target_logprob"][:, unknown]).all()
    assert not got["target_is_argmax"][:, unknown].any()
    assert torch.isnan(got["target_logprob"]).sum() == 4


def test_greedy_on_tied_maxima_is_the_first_as_lm_eval_decides():
    """lm-eval's HFLM calls a continuation greedy when `argmax` (the first of tied maxima)
    is its token; bf16 logits tie often. Every path (trace, plain scoring, live) reads it here."""
    from ouro_lab.trace import head_signals, steps_head_signals

    logits = torch.full((2, 10), -5.0)
    logits[:, 3] = logits[:, 7] = 4.0  # tokens 3 and 7 tie
    target = torch.tensor([3, 7])
    want = logits.log_softmax(-1).argmax(-1) == target  # HFLM's rule
    assert want.tolist() == [True, False]
    one, _ = head_signals(logits, None, target)
    many, _ = steps_head_signals(logits[None].repeat(3, 1, 1), None, target)
    assert one["target_is_argmax"].tolist() == want.tolist() and one["argmax"].tolist() == [3, 3]
    assert many["target_is_argmax"].tolist() == [want.tolist()] * 3


def test_step_signals_bfloat16_model_is_computed_in_float32(tiny):
    m16 = OuroForCausalLM(tiny.config).to(torch.bfloat16)
    m16.load_state_dict({k: v.to(torch.bfloat16) for k, v in tiny.state_dict().items()})
    ids = torch.randint(tiny.config.vocab_size, (1, 6))
    with torch.no_grad():
        out = m16.eval()(ids)
        got = step_signals(m16, out, ids, torch.ones_like(ids, dtype=torch.bool))
    assert got["entropy"].dtype == torch.float32
    want = brute_force(out, ids, torch.ones_like(ids, dtype=torch.bool))
    torch.testing.assert_close(got["max_prob"].double(), want["max_prob"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["exit_pdf"].sum(0), torch.ones(6))


def make_trace(n=30, steps=4, seed=0, meta=None):
    return Trace(random_signals(steps, n, seed), torch.arange(n) // 10, torch.arange(n) % 10,
                 torch.arange(n) % 10 + 5, meta if meta is not None else {"model": "abc", "steps": steps})


def test_trace_round_trip(tmp_path):
    tr = make_trace(meta={"model": "abc", "steps": 4, "texts": ["héllo", "wörld"], "cost": None})
    path = tr.save(tmp_path / "sub" / "t.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["t.safetensors"]  # no temp file left
    back = Trace.load(path)
    assert back.meta == tr.meta
    for k in tr.signals:
        assert back.signals[k].dtype == tr.signals[k].dtype
        assert torch.equal(back.signals[k], tr.signals[k]), k
    for k in ("request", "position", "ctx"):
        assert torch.equal(getattr(back, k), getattr(tr, k))
    st = __import__("ouro_lab.registry", fromlist=["x"]).make_strategy("threshold", {"q": 0.5})
    assert torch.equal(replay(st, back.to_signals()), replay(st, tr.to_signals()))


def test_trace_load_errors(tmp_path):
    with pytest.raises(TraceError, match="no such trace file"):
        Trace.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TraceError, match="junk.safetensors: not a readable trace"):
        Trace.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(TraceError, match="not an ouro-lab trace"):
        Trace.load(tmp_path / "other.safetensors")
    with pytest.raises(TraceError, match=r"expected \(R, 5\)"):
        Trace(random_signals(4, 6), torch.zeros(5), torch.zeros(5), torch.zeros(5))


def test_trace_key_covers_what_produced_it():
    base = dict(model="f1", steps=4, dtype="float32", texts=["a b"], ids=[[1, 2, 3]])
    k = Trace.key(**base)
    assert k == Trace.key(**dict(reversed(list(base.items()))))  # order of parts does not matter
    for change in (dict(model="f2"), dict(steps=3), dict(dtype="bfloat16"), dict(texts=["a  b"]),
                   dict(ids=[[1, 2, 4]])):
        assert Trace.key(**{**base, **change}) != k, change
    assert Trace.key(ids=torch.tensor([1, 2])) == Trace.key(ids=[1, 2])


def test_cat_and_groups():
    a, b = make_trace(30, seed=0), make_trace(20, seed=1, meta={"model": "abc", "steps": 4, "batch": 2})
    b.request += 3
    c = Trace.cat([a, b])
    assert c.n == 50 and c.meta == {"model": "abc", "steps": 4, "batch": [None, 2]}
    assert torch.equal(c.signals["kl_prev"][:, 30:], b.signals["kl_prev"])
    s = c.to_signals()
    assert torch.equal(s.group, c.request) and torch.equal(s.index, torch.arange(50))
    st = __import__("ouro_lab.registry", fromlist=["x"]).make_strategy("threshold", {"q": 0.5})
    e = replay(st, s, granularity="sequence")
    for r in range(5):
        assert e[c.request == r].unique().numel() == 1
    with pytest.raises(TraceError, match="different signals or steps"):
        Trace.cat([a, make_trace(5, steps=3)])
    # draw keys: by (request, position) from a unit table; by index where cat made a list of tables
    units = lambda t: [[t, d, 0, -1] for d in range(4)]  # noqa: E731
    one = make_trace(40, meta={"steps": 4, "units": units("x")})
    assert not torch.equal(one.to_signals().draw, one.to_signals().index)
    two = Trace.cat([one, make_trace(40, meta={"steps": 4, "units": units("y")})])
    assert len(two.meta["units"]) == 2 and torch.equal(two.to_signals().draw, torch.arange(80))


def test_trace_text_on_the_fixture(fixture_dir):
    from ouro_lab.loading import load_model

    model = load_model(fixture_dir, dtype="float32", device="cpu")
    tr = trace_text(model, None, ids="5 17 42 9", meta={"model": "fp"})
    assert tr.n == 4 and tr.steps == 4 and tr.meta["ids"] == [5, 17, 42, 9]
    assert tr.ctx.tolist() == [1, 2, 3, 4] and tr.position.tolist() == [0, 1, 2, 3]
    assert torch.isnan(tr.signals["target_logprob"][:, -1]).all()
    assert tr.cost().vocab == 256
    ids = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad():
        out = model(ids)
    torch.testing.assert_close(tr.signals["target_logprob"][:, 0],
                               out.all_logits()[:, 0, 0].log_softmax(-1)[:, 17])
    assert tr.meta["key"] != trace_text(model, None, ids="5 17 42 8", meta={"model": "fp"}).meta["key"]
    assert tr.meta["key"] == trace_text(model, None, ids=[5, 17, 42, 9], meta={"model": "fp"}).meta["key"]
    with pytest.raises(OuroLabError, match="no tokenizer"):
        trace_text(model, None, "hello")
    with pytest.raises(OuroLabError, match="token id 999 out of range"):
        trace_text(model, None, ids="1 999")


def test_trace_cli_end_to_end(fixture_dir, tmp_path):
    out = cli("trace", fixture_dir, "--ids", "5 17 42 9 9", "--out", tmp_path / "o")
    assert out.returncode == 0, out.stderr
    assert "exit pdf by step" in out.stdout and "step 4 pred" in out.stdout
    files = sorted((tmp_path / "o").iterdir())
    assert [f.suffix for f in files] == [".png", ".safetensors"]
    assert files[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tr = Trace.load(files[1])
    assert tr.meta["ids"] == [5, 17, 42, 9, 9] and tr.meta["model_dir"] == str(fixture_dir)
    from ouro_lab.loading import fingerprint
    assert tr.meta["model"] == fingerprint(fixture_dir)
    assert files[1].name == f"trace-{tr.meta['key'][:12]}.safetensors"
    json.dumps(tr.meta)


@pytest.mark.parametrize("args,msg", [
    (["--text", "hello"], "no tokenizer: pass token ids with --ids"),
    (["--ids", "1 x 3"], "expected space-separated integers"),
    (["--ids", "1 2", "--text", "a"], "exactly one of --text"),
    (["--ids", "1 256"], "token id 256 out of range"),
])
def test_trace_cli_bad_input(fixture_dir, tmp_path, monkeypatch, capsys, args, msg):
    out = run_cli(monkeypatch, capsys, "trace", fixture_dir, *args, "--out", tmp_path)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and msg in out.stderr
    assert out.stderr.strip().count("\n") == 0
    assert not list(tmp_path.iterdir())


def test_trace_cli_with_a_tokenizer(fixture_dir, tmp_path, monkeypatch, capsys):
    """--text through a real (tiny, word-level) tokenizer saved next to the weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "the", "loop", "thinks", "twice"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>").save_pretrained(tmp_path / "m")
    for f in ("config.json", "model.safetensors"):
        (tmp_path / "m" / f).symlink_to(fixture_dir / f)
    out = run_cli(monkeypatch, capsys, "trace", tmp_path / "m", "--text", "the loop thinks twice",
                  "--out", tmp_path / "o")
    assert out.returncode == 0, out.stderr
    assert "thinks" in out.stdout
    tr = Trace.load(next((tmp_path / "o").glob("*.safetensors")))
    assert tr.meta["ids"] == [1, 2, 3, 4] and tr.meta["text"] == "the loop thinks twice"


def test_head_signals_is_the_one_definition():
    from ouro_lab.trace import head_signals

    z = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    vals, logp = head_signals(z)
    assert set(vals) == {"entropy", "max_prob", "margin", "argmax", "kl_prev"}
    assert torch.isinf(vals["kl_prev"]).all() and torch.equal(vals["argmax"], z.argmax(-1))
    vals2, _ = head_signals(z, logp, torch.tensor([0, 1, 2, 3, -1]))
    torch.testing.assert_close(vals2["kl_prev"], torch.zeros(5))  # same distribution twice
    assert torch.isnan(vals2["target_logprob"][4]) and not vals2["target_is_argmax"][4]


def test_steps_head_signals_is_head_signals_step_by_step_bit_for_bit():
    """The batched form step_signals uses gives, bit for bit, what head_signals gives one
    step at a time (so replay, plain k-step runs and live decoding keep agreeing)."""
    from ouro_lab.trace import head_signals, steps_head_signals

    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 7, 19, generator=g) * 3  # (S, n, V)
    tgt = torch.randint(19, (7,), generator=g)
    tgt[2] = -1
    for prev0 in (None, torch.randn(7, 19, generator=g).log_softmax(-1)):
        got, last = steps_head_signals(z, prev0, tgt)
        prev = prev0
        for r in range(4):
            want, prev = head_signals(z[r], prev, tgt)
            for k, v in want.items():
                assert torch.equal(got[k][r].nan_to_num(7.0), v.nan_to_num(7.0)), (k, r)
        assert torch.equal(last, prev)
