"""Load and save checkpoints in the published Ouro layout.

A checkpoint folder holds `config.json` and either `model.safetensors` or shards
listed in `model.safetensors.index.json`. Weights are read with safetensors only:
nothing is unpickled. Every problem becomes one `CheckpointError` line naming the
file and what to do.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ouro_lab.errors import CheckpointError, ConfigError, check_device
from ouro_lab.files import atomic_path, atomic_write
from ouro_lab.model import OuroConfig, OuroForCausalLM

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype | None, default: str = "float32") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype or default).removeprefix("torch.")
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported; use one of float32, bfloat16, "
                          "float16, float64")
    return DTYPES[name]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if not isinstance(device, torch.device):
        check_device(device)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} asked for but CUDA is not available; use device: cpu")
    return dev


def read_config(path: str | Path) -> OuroConfig:
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; point to a folder with config.json "
                              "and model.safetensors")
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing; a checkpoint folder needs config.json")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_file}: must hold a JSON object")
    return OuroConfig.from_dict(raw, source=str(cfg_file))


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e}); it needs a 'weight_map'") from None
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in {index.name} is missing")
        return files
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise CheckpointError(f"{path}: only pickled weights found; ouro-lab reads safetensors only "
                              "(convert with safetensors.torch.save_file)")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _open(f: Path, backend: str):
    """safetensors' safe_open; `pread` reads tensors into fresh memory instead of mapping the
    file (older safetensors without the option map it)."""
    from safetensors import safe_open

    try:
        return safe_open(str(f), framework="pt", backend=backend)
    except TypeError:
        return safe_open(str(f), framework="pt")


def read_state_dict(path: str | Path, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, converted to `dtype` / moved to `device` as it is
    read: peak memory is the converted weights plus one tensor as stored (converting a
    whole shard, or the whole state dict, at once would hold both copies). Unconverted CPU
    tensors stay mapped from the file (no copy, paged in when first used)."""
    from safetensors import SafetensorError

    dev = torch.device(device) if device is not None else torch.device("cpu")
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(Path(path)):
        try:
            with _open(f, "mmap") as fh:
                stored = {k: fh.get_slice(k).get_dtype() for k in fh.keys()}  # noqa: SIM118 (not a dict)
            convert = dev.type != "cpu" or any(dtype is not None and _ST_DTYPES.get(d) != dtype
                                               for d in stored.values())
            with _open(f, "pread" if convert else "mmap") as fh:
                for k in stored:
                    t = fh.get_tensor(k)
                    state[k] = t.to(device=dev, dtype=dtype or t.dtype) if convert else t
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({msg})") from None
    return state


def load_model(path: str | Path, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None) -> OuroForCausalLM:
    """Load an Ouro checkpoint folder. `dtype` defaults to the checkpoint's
    (`torch_dtype`/`dtype` in config.json); `device` to cuda, then mps, then cpu. Each
    tensor is converted as it is read (see `read_state_dict`)."""
    path = Path(path)
    cfg = read_config(path)
    torch_dtype = resolve_dtype(dtype, default=cfg.torch_dtype)
    dev = resolve_device(device)
    state = read_state_dict(path, dtype=torch_dtype, device=dev)
    with torch.device("meta"):
        model = OuroForCausalLM(cfg)
    expected = model.state_dict()
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        raise CheckpointError(f"{path}: weights do not match config.json: {'; '.join(parts)}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path}: {k} has shape {tuple(state[k].shape)}, config.json "
                                  f"implies {tuple(v.shape)}; the config does not match the weights")
    model.load_state_dict(state, strict=not cfg.tie_word_embeddings, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.config.torch_dtype = str(torch_dtype).removeprefix("torch.")
    return model.eval()


def save_model(model: OuroForCausalLM, path: str | Path, tokenizer=None) -> Path:
    """Write config.json + model.safetensors in the published layout (atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    with atomic_path(path / "model.safetensors", "model weights") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    atomic_write(path / "config.json", json.dumps(cfg, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def has_tokenizer(path: str | Path) -> bool:
    """Whether a checkpoint folder carries tokenizer files (tokenizer.json or its config)."""
    return any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def load_tokenizer(path: str | Path, bos_token_id: int | None = None, eos_token_id: int | None = None,
                   pad_token_id: int | None = None):
    """transformers' AutoTokenizer from the checkpoint folder.

    The published Ouro configs set bos, eos and pad all to 0; the chat (Thinking)
    variants end a turn with id 2 (`<|im_end|>`). Pass the ids to override."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    try:
        # transformers reads config.json too and frowns at `model_type: ouro` and the published
        # `rope_scaling: null`; neither matters for a tokenizer
        hf_logging.set_verbosity_error()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: no tokenizer loadable by AutoTokenizer ({first})") from None
    finally:
        hf_logging.set_verbosity(level)
    for name, value in (("bos", bos_token_id), ("eos", eos_token_id), ("pad", pad_token_id)):
        if value is not None:
            setattr(tok, f"{name}_token", tok.convert_ids_to_tokens(value))
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def fingerprint(path: str | Path) -> str:
    """A content hash of a checkpoint: config.json and every weight file, in full."""
    import hashlib

    path = Path(path)
    h = hashlib.blake2b(digest_size=16)
    h.update((path / "config.json").read_bytes())
    for f in _weight_files(path):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()
