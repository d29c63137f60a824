"""Numerical invariants of the reference model on tiny configs."""

import torch

from ouro_lab.model import KVCache, OuroForCausalLM, exit_distribution, init_weights


def make(cfg, seed=0):
    return init_weights(OuroForCausalLM(cfg), std=0.1, seed=seed).eval()


def test_output_shapes_and_exit_distribution(tiny_config):
    m = make(tiny_config)
    ids = torch.randint(0, 64, (3, 7))
    with torch.no_grad():
        out = m(ids)
    R, H = tiny_config.total_ut_steps, tiny_config.hidden_size
    assert out.step_hidden.shape == (R, 3, 7, H) and out.gate_logits.shape == (R, 3, 7)
    pdf, cdf = exit_distribution(out.gate_logits)
    torch.testing.assert_close(pdf.sum(0), torch.ones(3, 7))
    assert (pdf >= 0).all() and torch.equal(cdf[-1], torch.ones(3, 7))
    assert (cdf[1:] >= cdf[:-1]).all()
    assert out.logits(2).shape == (3, 7, 64) and out.all_logits().shape == (R, 3, 7, 64)


def test_fewer_steps_is_a_prefix_and_more_steps_extrapolates(tiny_config):
    m = make(tiny_config)
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        full = m(ids)
        two = m(ids, steps=2)
        six = m(ids, steps=6)
    torch.testing.assert_close(two.step_hidden, full.step_hidden[:2])
    torch.testing.assert_close(six.step_hidden[:4], full.step_hidden)
    assert six.steps == 6 and not torch.allclose(six.step_hidden[5], six.step_hidden[3])


def test_causality_future_tokens_do_not_change_the_past(tiny_config):
    m = make(tiny_config)
    ids = torch.randint(0, 64, (1, 8))
    ids2 = ids.clone()
    ids2[0, 5:] = (ids2[0, 5:] + 1) % 64
    with torch.no_grad():
        a, b = m(ids).step_hidden, m(ids2).step_hidden
    torch.testing.assert_close(a[:, :, :5], b[:, :, :5])
    assert not torch.allclose(a[:, :, 5:], b[:, :, 5:])


def test_left_padding_matches_the_unpadded_row(tiny_config):
    """A left-padded row with positions counted from its first real token equals the row alone."""
    m = make(tiny_config)
    ids = torch.randint(1, 64, (1, 6))
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), ids), 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = m(ids).step_hidden
        pad = m(padded, mask, position_ids=pos).step_hidden
    torch.testing.assert_close(pad[:, :, 3:], alone, atol=1e-5, rtol=1e-5)


def test_cache_decoding_equals_full_forward_with_gqa(tiny_config):
    assert tiny_config.num_key_value_heads < tiny_config.num_attention_heads  # GQA path
    m = make(tiny_config)
    ids = torch.randint(0, 64, (2, 10))
    cache = KVCache()
    with torch.no_grad():
        full = m(ids).step_hidden
        parts = [m(ids[:, :6], cache=cache).step_hidden]
        for t in range(6, 10):
            parts.append(m(ids[:, t:t + 1], cache=cache).step_hidden)
    torch.testing.assert_close(torch.cat(parts, 2), full, atol=1e-5, rtol=1e-5)
    assert len(cache) == 10 and len(cache.kv) == 4 * 2


def test_left_padded_batch_generation_equals_each_row_alone(tiny_config):
    m = make(tiny_config, seed=3)
    a = torch.randint(1, 64, (1, 4))
    b = torch.randint(1, 64, (1, 7))
    batch = torch.cat((torch.cat((torch.zeros(1, 3, dtype=torch.long), a), 1), b))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    out = m.generate(batch, mask, max_new_tokens=6)
    assert torch.equal(out[0, 7:], m.generate(a, max_new_tokens=6)[0, 4:])
    assert torch.equal(out[1, 7:], m.generate(b, max_new_tokens=6)[0, 7:])


def test_right_padded_generation_is_refused(tiny_config):
    """The next token is read at the last column: a right-padded row decoded from padding
    (row 1 gave [41, 13, 7, 23, 18, 48] where alone it gives [7, 13, 13, 13, 23, 18])."""
    import pytest

    m = make(tiny_config, seed=3)
    ids = torch.randint(1, 64, (2, 5))
    mask = torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])
    for use_cache in (True, False):
        with pytest.raises(ValueError, match="prompt row 1 ends in padding.*padding_side = 'left'"):
            m.generate(ids, mask, max_new_tokens=3, use_cache=use_cache)


def test_bad_rope_scaling_is_refused():
    import pytest

    from ouro_lab.errors import ConfigError
    from ouro_lab.model import OuroConfig

    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=2)
    with pytest.raises(ConfigError, match="rope type 'yarn' is not supported"):
        OuroConfig.from_dict({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4}})
    with pytest.raises(ConfigError, match="missing field"):
        OuroConfig.from_dict({"vocab_size": 8})
    cfg = OuroConfig.from_dict({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5.0}})
    assert cfg.rope_theta == 5.0
