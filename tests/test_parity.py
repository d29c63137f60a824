"""Parity with the official Ouro code, read from ../shared/fixtures/ouro-parity/tiny_mha."""

import pytest
import torch

from ouro_lab.loading import load_model
from ouro_lab.model import KVCache, exit_distribution

TOL = 1e-4
QS = {"0p25": 0.25, "0p5": 0.5, "0p75": 0.75, "0p9": 0.9, "0p99": 0.99}


def close(a, b, tol=TOL, where=None):
    a, b = a.double(), b.double()
    if where is not None:
        a, b = a[where], b[where]
    err = (a - b).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g} > {tol}"
    return err


@pytest.fixture(scope="module")
def model(fixture_dir):
    return load_model(fixture_dir, dtype="float32", device="cpu")


def threshold_steps(cdf, q):
    """Ouro's Q-exit on a (R, ...) cdf: first step with cdf >= q, else the last step."""
    hit = cdf >= q
    return torch.where(hit.any(0), hit.float().argmax(0), cdf.shape[0] - 1)


@pytest.mark.parametrize("prefix", ["", "pad_"])
def test_per_step_states_gates_and_exit_distribution(model, expected, prefix):
    e = expected
    ids, mask = e[prefix + "input_ids"], e[prefix + "attention_mask"]
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    valid = mask.bool()
    close(model.model.embed_tokens(ids), e[prefix + "embeddings"], where=valid)
    for r in range(4):
        close(out.step_hidden[r], e[prefix + "per_step_hidden"][r], where=valid)
        close(out.logits(r), e[prefix + "per_step_logits"][r], where=valid)
        close(out.logits(r), e[prefix + f"logits_exit_at_step_{r}"], where=valid)
    close(out.gate_logits, e[prefix + "gate_logits"], where=valid[None].expand(4, -1, -1))
    close(torch.sigmoid(out.gate_logits), e[prefix + "exit_lambda"], where=valid[None].expand(4, -1, -1))
    pdf, cdf = out.exit_pdf(), out.exit_cdf()
    close(pdf.permute(1, 2, 0), e[prefix + "exit_pdf"], where=valid)
    close(cdf.permute(1, 2, 0), e[prefix + "exit_cdf"], where=valid)
    torch.testing.assert_close(pdf.sum(0), torch.ones_like(pdf[0]))
    weighted = sum(pdf[r][..., None] * out.logits(r) for r in range(4))
    close(weighted, e[prefix + "logits_weighted_exit"], where=valid)
    # the official default (threshold 1.0) and every threshold q: same steps, same logits
    for tag, q in [("default", 1.0)] + [(f"exit_threshold_{k}", v) for k, v in QS.items()]:
        steps = threshold_steps(cdf, q)
        if tag != "default":
            assert torch.equal(steps[valid], e[prefix + tag.replace("logits", "").replace(
                "exit_threshold", "exit_steps_threshold")][valid].long())
        close(model.lm_head(out.gather_hidden(steps)), e[prefix + f"logits_{tag}"], where=valid)


def test_layer_outputs_match_official_unroll(model, expected):
    """Manual unroll of the shared stack, layer by layer, against `layer_outputs`."""
    ids = expected["input_ids"]
    with torch.no_grad():
        x, ctx = model.prepare(ids)
        for r in range(4):
            for i, layer in enumerate(model.model.layers):
                x = layer(x, ctx)
                close(x, expected["layer_outputs"][r, i])
            x = model.model.norm(x)
        close(x, expected["last_hidden_state"])


def test_training_loss_matches_official(model, expected):
    e = expected
    with torch.no_grad():
        out = model(e["input_ids"])
    pdf = out.exit_pdf()
    logits = sum(pdf[r][..., None] * out.logits(r) for r in range(4))
    close(logits, e["logits_with_labels"])
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), e["labels"][:, 1:].reshape(-1))
    close(loss, e["loss_with_labels"])


def test_float64_run(fixture_dir, expected):
    # the official norms and rope run in float32 even for float64 weights; we measure ~2e-6
    m64 = load_model(fixture_dir, dtype="float64", device="cpu")
    e = expected
    with torch.no_grad():
        out = m64(e["input_ids"])
    assert out.step_hidden.dtype == torch.float64
    close(out.step_hidden, e["fp64_per_step_hidden"], tol=1e-5)
    close(out.gate_logits, e["fp64_gate_logits"], tol=1e-5)
    close(out.all_logits(), e["fp64_per_step_logits"], tol=1e-5)
    close(exit_distribution(out.gate_logits)[0].permute(1, 2, 0), e["fp64_exit_pdf"], tol=1e-5)


def test_incremental_decoding_matches_official(model, expected):
    ids = expected["input_ids"]
    cache = KVCache()
    with torch.no_grad():
        pre = model(ids[:, :8], cache=cache)
        logits = [pre.logits(-1)[:, -1]]
        for t in range(8, 12):
            logits.append(model(ids[:, t:t + 1], cache=cache).logits(-1)[:, -1])
    assert len(cache.kv) == int(expected["incremental_cache_num_entries"])
    assert list(cache.get(3, 1)[0].shape) == expected["incremental_cache_entry_shape"].tolist()
    close(torch.stack(logits, 1), expected["incremental_logits_pos7_to_11"])


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation(model, expected, use_cache):
    out = model.generate(expected["input_ids"], max_new_tokens=8, use_cache=use_cache,
                         eos_token_id=model.config.eos_token_id)
    assert torch.equal(out, expected["generate_greedy_use_cache_true"])


@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_generation_is_correct_with_and_without_cache(model, expected, use_cache):
    e = expected
    out = model.generate(e["generate_leftpad_input_ids"], e["generate_leftpad_attention_mask"],
                         max_new_tokens=8, use_cache=use_cache, eos_token_id=model.config.eos_token_id)
    assert torch.equal(out, e["generate_leftpad_use_cache_false"])


def test_hub_style_config_loads_the_same_model(fixture_dir, tmp_path, expected):
    import shutil

    shutil.copy(fixture_dir / "config.hub-style.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").symlink_to(fixture_dir / "model.safetensors")
    m = load_model(tmp_path)
    assert m.dtype == torch.float32 and m.config.rope_theta == 1e6
    with torch.no_grad():
        close(m(expected["input_ids"]).step_hidden, expected["per_step_hidden"])
