"""bench/ouro_1p4b.py: the random checkpoint in the published layout (tiny shape, fast) and, `slow`,
the exact Ouro-1.4B shape: inspect, load memory (goal <= 1.2x the weights), a trace pass."""

import importlib.util
import json
import resource
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("ouro_1p4b", ROOT / "bench" / "ouro_1p4b.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_checkpoint_in_the_published_layout(tmp_path):
    """Shards + index + hub-style config, loaded by load_model; converting bfloat16 shards to
    float32 holds the converted weights plus one tensor, not both copies."""
    import torch

    from ouro_lab.flops import ModelCost
    from ouro_lab.loading import fingerprint, load_model, load_tokenizer, read_config

    b = _bench()
    cfg = {**b.PUBLISHED_CONFIG, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 176,
           "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16}
    path = b.write_checkpoint(tmp_path / "ckpt", config=cfg, shard_gb=40_000 / 2**30)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {f.name for f in shards}
    cost = ModelCost.from_config(read_config(path))
    assert index["metadata"]["total_size"] == cost.weight_bytes("bfloat16")
    published = json.loads((path / "config.json").read_text())
    assert published["torch_dtype"] == "bfloat16" and published["rope_scaling"] is None
    assert "auto_map" in published and "rope_theta" in published
    m32 = load_model(path, dtype="float32")
    m16 = load_model(path)
    assert m16.dtype == torch.bfloat16 and m32.dtype == torch.float32
    for (k, a), (_, w) in zip(m32.state_dict().items(), m16.state_dict().items(), strict=True):
        assert torch.equal(a, w.float()), k
    assert len(load_tokenizer(path)) == 512 and fingerprint(path)


@pytest.mark.slow
def test_ouro_1p4b_shape_end_to_end(capsys):
    """Writes (once, 2.9 GB under $TMPDIR) and measures the exact 1.4B shape: about 6 GB of RAM
    and a few minutes on one CPU thread."""
    b = _bench()
    res = b.main(["--docs", "2", "--dir", str(b.default_dir())])
    out = capsys.readouterr().out
    assert "parameters: 1,434,652,673" in out and "24 layers x 4 steps, hidden 2048" in out
    assert res["ratio"] <= 1.2 and out.strip().splitlines()[-1] == f"ratio: {res['ratio']:.3f}"
    tr = res["trace"]
    assert tr["tokens_run"] <= 1.05 * tr["prefix_tree_tokens"] < tr["requested_tokens"] / 3
    assert 0 <= tr["acc"] <= 1 and tr["peak_rss"] <= 1.3 * res["load"]["weights_bytes"]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 < 2e9  # measured in children
