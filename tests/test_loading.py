"""Checkpoint folders: both config layouts, shards, dtypes, tokenizer, and every bad input."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from ouro_lab.errors import CheckpointError, ConfigError
from ouro_lab.loading import fingerprint, load_model, load_tokenizer, save_model
from ouro_lab.model import OuroForCausalLM, init_weights


def cli(*args):
    return subprocess.run([sys.executable, "-m", "ouro_lab.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def ckpt(tmp_path, tiny_config):
    m = init_weights(OuroForCausalLM(tiny_config), seed=1)
    return save_model(m, tmp_path / "ckpt"), m


def test_save_load_round_trip_and_fingerprint(ckpt):
    path, m = ckpt
    m2 = load_model(path)
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).step_hidden, m(ids).step_hidden)
    assert fingerprint(path) == fingerprint(path)
    before = fingerprint(path)
    w = m.state_dict()
    w["model.norm.weight"] += 1
    m.load_state_dict(w)
    assert fingerprint(save_model(m, path)) != before


def test_dtype_defaults_to_the_checkpoint_and_can_be_overridden(ckpt):
    path, _ = ckpt
    assert load_model(path).dtype == torch.float32
    assert load_model(path, dtype="bfloat16").dtype == torch.bfloat16
    cfg = json.loads((path / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(cfg))
    assert load_model(path).dtype == torch.bfloat16


def test_sharded_checkpoint(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    path, m = ckpt
    state = load_file(str(path / "model.safetensors"))
    keys = sorted(state)
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(path / "config.json", out / "config.json")
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(out / name))
        weight_map.update(dict.fromkeys(part, name))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ids = torch.randint(0, 64, (1, 4))
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(ids).step_hidden, m(ids).step_hidden)


def test_tied_embeddings_round_trip(tmp_path, tiny_config):
    from dataclasses import replace

    cfg = replace(tiny_config, tie_word_embeddings=True)
    m = init_weights(OuroForCausalLM(cfg), seed=2)
    m2 = load_model(save_model(m, tmp_path / "tied"))
    assert m2.lm_head.weight is m2.model.embed_tokens.weight
    torch.testing.assert_close(m2.lm_head.weight, m.lm_head.weight)


def test_tokenizer_loads_with_autotokenizer_and_ids_are_overridable(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "<|im_end|>": 2, "a": 3, "b": 4}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<pad>", eos_token="<pad>",
                            pad_token="<pad>").save_pretrained(str(tmp_path))
    tok = load_tokenizer(tmp_path)
    assert tok("a b").input_ids == [3, 4] and tok.eos_token_id == 0
    chat = load_tokenizer(tmp_path, eos_token_id=2)
    assert chat.eos_token_id == 2 and chat.pad_token_id == 0
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_tokenizer(tmp_path / "nope")


def corrupt(path, how):
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    cfg = json.loads(cfg_file.read_text())
    if how == "missing_dir":
        shutil.rmtree(path)
    elif how == "no_config":
        cfg_file.unlink()
    elif how == "bad_json":
        cfg_file.write_text("{not json")
    elif how == "missing_field":
        del cfg["hidden_size"]
        cfg_file.write_text(json.dumps(cfg))
    elif how == "bad_value":
        cfg["num_hidden_layers"] = "two"
        cfg_file.write_text(json.dumps(cfg))
    elif how == "rope":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
        cfg_file.write_text(json.dumps(cfg))
    elif how == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        weights.write_bytes(b"\x00" * 64)
    elif how == "no_weights":
        weights.unlink()
    elif how == "pickle_only":
        weights.unlink()
        (path / "pytorch_model.bin").write_bytes(b"x")
    elif how in ("missing_key", "unexpected_key", "wrong_shape"):
        from safetensors.torch import load_file, save_file

        state = load_file(str(weights))
        if how == "missing_key":
            del state["model.norm.weight"]
        elif how == "unexpected_key":
            state["model.extra.weight"] = torch.zeros(2)
        else:
            state["model.norm.weight"] = torch.zeros(3)
        save_file(state, str(weights))


BAD = {
    "missing_dir": "not a directory",
    "no_config": "config.json: missing",
    "bad_json": "not valid JSON",
    "missing_field": "missing field(s) hidden_size",
    "bad_value": "num_hidden_layers must be a positive integer",
    "rope": "rope type 'linear' is not supported",
    "truncated": "corrupt or truncated safetensors",
    "garbage": "corrupt or truncated safetensors",
    "no_weights": "no model.safetensors",
    "pickle_only": "reads safetensors only",
    "missing_key": "missing keys ['model.norm.weight']",
    "unexpected_key": "unexpected keys ['model.extra.weight']",
    "wrong_shape": "model.norm.weight has shape (3,)",
}


@pytest.mark.parametrize("how", sorted(BAD))
def test_bad_checkpoints_give_one_line_errors(ckpt, how):
    path, _ = ckpt
    corrupt(path, how)
    with pytest.raises((CheckpointError, ConfigError)) as e:
        load_model(path)
    msg = str(e.value)
    assert BAD[how] in msg and "\n" not in msg and str(path) in msg


@pytest.mark.parametrize("how", ["truncated", "missing_field", "wrong_shape"])
def test_cli_bad_checkpoint_exits_2_with_one_line(ckpt, how):
    path, _ = ckpt
    corrupt(path, how)
    r = cli("inspect", path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr and BAD[how] in r.stderr


def test_cli_inspect_fixture(fixture_dir):
    r = cli("inspect", fixture_dir, "--text", "1 2 3")
    assert r.returncode == 0, r.stderr
    assert "parameters: " in r.stdout and "step 4: exit p" in r.stdout
