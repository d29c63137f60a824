import pytest

from ouro_lab.flops import OURO_1_4B, ModelCost


def test_ouro_1_4b_figures_are_pinned():
    c = OURO_1_4B
    assert c.params == 1_434_652_673
    assert round(c.layer_flops / 1e9, 3) == 2.466
    assert c.attn_flops_per_ctx == 196_608
    assert round(c.head_flops / 1e6, 1) == 201.3
    assert c.gate_flops == 4096
    assert c.kv_bytes_per_step("bfloat16") == 2 * 24 * 16 * 128 * 2


def test_param_count_matches_a_built_model(tiny_config):
    from ouro_lab.model import OuroForCausalLM

    m = OuroForCausalLM(tiny_config)
    assert ModelCost.from_config(tiny_config).params == m.num_parameters()


def test_sequence_flops_is_the_sum_of_token_flops():
    c = OURO_1_4B
    total = sum(c.token_flops(3, ctx=5 + t + 1, readouts=2) for t in range(7))
    assert c.sequence_flops(7, steps=3, readouts=2, past=5) == pytest.approx(total, rel=1e-12)


def test_matmul_flops_match_a_counted_forward(tiny_config):
    """FLOPs counted by torch's FlopCounterMode for one forward equal sequence_flops."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ouro_lab.model import OuroForCausalLM

    m = OuroForCausalLM(tiny_config)
    c = ModelCost.from_config(tiny_config)
    T = 9
    ids = torch.randint(0, tiny_config.vocab_size, (1, T))
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        out = m(ids, steps=3)
        out.logits(-1)
    # FlopCounterMode does not count masked scaled_dot_product_attention: compare the rest
    causal_attn = 3 * c.attn_flops_per_ctx * T * (T + 1) / 2
    expected = c.sequence_flops(T, steps=3, readouts=1) - causal_attn
    assert fc.get_total_flops() == pytest.approx(expected, rel=1e-9)
