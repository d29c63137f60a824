"""The Ouro looped language model in plain PyTorch.

Read top to bottom: config, RMSNorm, rotary embedding, attention, MLP, decoder
layer, the looped model, the causal-LM wrapper. Module names are the published
checkpoint keys (`model.layers.N.self_attn.q_proj`, `model.early_exit_gate`, ...),
so `load_state_dict(strict=True)` takes ByteDance's Ouro-1.4B / 2.6B as they are.

What the official code hides and this file shows: the normed state after every
loop step and the exit gate's logit for it. `forward` is the loop and nothing
else; exit policies live in `strategies/`. The static KV cache (one slot per loop
step and layer, written in place, correct under left padding) and the per-call
attention context live in `ouro_lab/cache.py`.

Left out on purpose: sliding-window attention (Ouro does not use it), rope
scaling other than the default, dropout, training-time tricks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ouro_lab.cache import Context, KVCache, attention
from ouro_lab.errors import ConfigError


@dataclass
class OuroConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    total_ut_steps: int = 4
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    early_exit_threshold: float = 1.0
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    pad_token_id: int | None = 0
    torch_dtype: str = "float32"
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> OuroConfig:
        """Accept both the published layout (top-level `rope_theta`, `rope_scaling`,
        `torch_dtype`) and the current transformers one (`rope_parameters`, `dtype`)."""
        missing = [k for k in cls.REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}; "
                              "add them (see an Ouro config.json)")
        d = dict(d)
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported; "
                              "only the default RoPE (rope_scaling: null) is")
        if "rope_theta" not in d and "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        if "torch_dtype" not in d and "dtype" in d:
            d["torch_dtype"] = d["dtype"]
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {d['hidden_act']!r} is not supported; use 'silu'")
        if d.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported; set it to false")
        names = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        try:
            cfg = cls(**kwargs, extra=extra)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None
        for k in cls.REQUIRED + ("total_ut_steps",):
            v = getattr(cfg, k)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{source}: field {k} must be a positive integer, got {v!r}")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ConfigError(f"{source}: num_attention_heads must be a multiple of num_key_value_heads")
        return cfg

    def to_dict(self) -> dict:
        """The published layout, so `from_dict(to_dict())` round-trips."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        d.update({"architectures": ["OuroForCausalLM"], "model_type": "ouro",
                  "rope_scaling": None, "use_sliding_window": False})
        return {**self.extra, **d}


# --------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype  # normalise in float32, scale in the input dtype (as Llama/Ouro do)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


@functools.lru_cache(maxsize=16)
def _inv_freq(head_dim: int, theta: float, device: torch.device) -> Tensor:
    """RoPE's inverse frequencies (head_dim/2,), made once per shape and device (decoding
    asks for them every token)."""
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor, whatever mode asks first
        exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim
        return 1.0 / (theta ** exponents)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """Default RoPE tables for integer positions (B, T) -> cos, sin (B, T, head_dim)."""
    freqs = positions.float()[..., None] * _inv_freq(head_dim, theta, positions.device)  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x (B, nh, T, hd); cos/sin (B, T, hd)
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: OuroConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, ctx: Context, slot: tuple[int, int] | None = None) -> Tensor:
        """x (B, T, C). Without a cache the queries attend over this call's tokens; with one
        (`ctx.cache`, `slot` = (loop step, layer)) this call's K/V are written into the cache
        in place and the queries attend over their rows' cached keys."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)    # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        y = attention(q, k, v, ctx.mask) if ctx.cache is None else ctx.cache.attend(ctx, slot, q, k, v)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: OuroConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    """Sandwich norm: each sub-block's output is normed again before the residual add."""

    def __init__(self, cfg: OuroConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm_2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm_2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, ctx: Context, slot: tuple[int, int] | None = None) -> Tensor:
        x = x + self.input_layernorm_2(self.self_attn(self.input_layernorm(x), ctx, slot))
        return x + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(x)))


# --------------------------------------------------------------------------- outputs


def exit_distribution(gate_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Ouro's exit distribution over steps from gate logits (R, ...) -> pdf, cdf (R, ...).

    p_t = lambda_t * prod_{j<t} (1 - lambda_j) for t < R-1, and the last step takes the
    remaining mass. The cdf is clamped to 1 and set to exactly 1 at the last step, so a
    threshold q <= 1 always finds an exit even where float rounding left the sum short.
    """
    lam = torch.sigmoid(gate_logits.float())
    pdf, remaining = [], torch.ones_like(lam[0])
    for t in range(lam.shape[0]):
        if t < lam.shape[0] - 1:
            pdf.append(lam[t] * remaining)
            remaining = remaining * (1 - lam[t])
        else:
            pdf.append(remaining)
    pdf = torch.stack(pdf)
    cdf = pdf.cumsum(0).clamp(max=1.0)
    cdf[-1] = 1.0
    return pdf, cdf


@dataclass(frozen=True)
class LoopOutput:
    step_hidden: Tensor          # (R, B, T, H) normed state after each step (feeds the next step)
    gate_logits: Tensor          # (R, B, T)    raw exit-gate outputs, before sigmoid
    lm_head: nn.Module = field(repr=False)
    cache: KVCache | None = field(default=None, repr=False)

    @property
    def steps(self) -> int:
        return self.step_hidden.shape[0]

    def exit_pdf(self) -> Tensor:  # (R, B, T), sums to 1 over R
        return exit_distribution(self.gate_logits)[0]

    def exit_cdf(self) -> Tensor:  # (R, B, T), last step exactly 1
        return exit_distribution(self.gate_logits)[1]

    def logits(self, step: int = -1) -> Tensor:
        """Full-vocabulary logits of one step (B, T, V); steps are 0-based."""
        return self.lm_head(self.step_hidden[step])

    def all_logits(self) -> Tensor:
        """(R, B, T, V) for every step at once. Memory grows with R x V: only on request."""
        return torch.stack([self.logits(r) for r in range(self.steps)])

    def gather_hidden(self, exit_steps: Tensor) -> Tensor:
        """The state each token exits with: exit_steps (B, T) int -> (B, T, H)."""
        idx = exit_steps[None, ..., None].expand(1, *exit_steps.shape, self.step_hidden.shape[-1])
        return self.step_hidden.gather(0, idx)[0]


# --------------------------------------------------------------------------- model


class OuroModel(nn.Module):
    """Embeddings, one shared layer stack, the final norm and the exit gate."""

    def __init__(self, cfg: OuroConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.early_exit_gate = nn.Linear(cfg.hidden_size, 1)


class OuroForCausalLM(nn.Module):
    def __init__(self, cfg: OuroConfig):
        super().__init__()
        self.config = cfg
        self.model = OuroModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def new_cache(self, batch: int, capacity: int, shared: bool = False, steps: int | None = None) -> KVCache:
        """A preallocated KV cache for `batch` rows of `capacity` tokens (see `KVCache`)."""
        return KVCache(shared, steps).allocate(self.config, batch, capacity, self.dtype, self.device)

    # -- the pieces of one forward, public so that live early exit can run them row by row

    def prepare(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: KVCache | None = None,
                rows: Tensor | None = None) -> tuple[Tensor, Context]:
        """Embeddings and the `Context` (rope tables, attention mask, cache columns) of `input_ids` (B, T).

        `attention_mask` (B, T) marks the real tokens of this call (1) and padding (0); the
        cache remembers earlier calls'. Without `position_ids`, positions count real tokens,
        from the cache's next position per row (else from 0); with them, a row's next
        position is its last one + 1. With a cache, `rows` (B,) sorted
        names the cache rows this call feeds (default: all, in order).
        """
        B, T = input_ids.shape
        dev = input_ids.device
        real = (torch.ones(B, T, dtype=torch.bool, device=dev) if attention_mask is None
                else attention_mask.to(dev).bool())
        if cache is not None and cache.store is None:
            cache.allocate(self.config, B, T, self.dtype, dev)
        if rows is not None:
            rows = torch.as_tensor(rows, dtype=torch.long).cpu()
        if position_ids is None:
            start = (torch.zeros(B, dtype=torch.long, device=dev) if cache is None else
                     cache.next_pos if rows is None else cache.next_pos[rows.to(dev)])
            if attention_mask is None:  # every token real: positions run on from `start`
                position_ids, pos_next = start[:, None] + torch.arange(T, device=dev), start + T
            else:
                counts = real.long().cumsum(-1)
                position_ids = start[:, None] + (counts - 1).clamp(min=0)
                pos_next = start + real.sum(1)
        else:
            pos_next = position_ids[:, -1] + 1
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        # rows holding padding (CPU); on `meta` nothing can be read, so assume every row does
        padded = (None if attention_mask is None else torch.ones(B, dtype=torch.bool) if dev.type == "meta"
                  else (~real).any(1).cpu())
        if cache is not None:
            if rows is None:
                rows, cache.next_pos = torch.arange(B), pos_next
            else:
                cache.next_pos[rows.to(dev)] = pos_next
            return x, cache.open(real, rows, padded, cos, sin)
        if padded is None or not padded.any():
            return x, Context(cos, sin, None)  # nothing to mask but the future: plain causal attention
        # query i may see the real keys j <= i, and always itself (no empty, NaN softmax rows)
        i = torch.arange(T, device=dev)
        mask = ((i[None, :] <= i[:, None])[None] & real[:, None, :]) | (i[None, :] == i[:, None])
        return x, Context(cos, sin, mask[:, None])

    def loop_step(self, x: Tensor, step: int, ctx: Context) -> Tensor:
        """One pass through the shared stack, then the final norm. Returns the normed
        state (B, T, H), which is both this step's output and the next step's input."""
        for i, layer in enumerate(self.model.layers):
            x = layer(x, ctx, (step, i))
        return self.model.norm(x)  # the normed state feeds the next step

    def gate(self, h: Tensor) -> Tensor:
        return self.model.early_exit_gate(h).squeeze(-1)  # (B, T)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                steps: int | None = None, position_ids: Tensor | None = None,
                cache: KVCache | None = None, rows: Tensor | None = None) -> LoopOutput:
        """Run `steps` loop steps (default `total_ut_steps`; fewer really stops early,
        more extrapolates past the trained depth) and return every step's state and gate.
        With a cache, `rows` names the cache rows fed (see `prepare`)."""
        steps = self.config.total_ut_steps if steps is None else steps
        x, ctx = self.prepare(input_ids, attention_mask, position_ids, cache, rows)
        hidden, gates = [], []
        for r in range(steps):
            x = self.loop_step(x, r, ctx)
            hidden.append(x)
            gates.append(self.gate(x))
        return LoopOutput(torch.stack(hidden), torch.stack(gates), self.lm_head, cache)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 max_new_tokens: int = 32, steps: int | None = None, use_cache: bool = True,
                 eos_token_id: int | None = None, cache: KVCache | None = None) -> Tensor:
        """Greedy decoding from the last step's logits. Left-padded prompts are handled:
        positions count real tokens only (as transformers' generate does). Rows that
        emitted `eos_token_id` keep emitting it. `cache`: continue sequences already in a
        cache (`input_ids` are their next tokens), e.g. a shared prefix prefilled once."""
        B, T = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        if attention_mask is not None and T and mask.device.type != "meta" and not bool(mask[:, -1].all()):
            # the next token is read at the last column
            row = int((mask[:, -1] == 0).nonzero()[0])
            raise ValueError(f"generate: prompt row {row} ends in padding (attention_mask 0 in its last "
                             "column); pad prompts on the left (tokenizer.padding_side = 'left')")
        ids = torch.cat((input_ids, input_ids.new_zeros(B, max_new_tokens)), 1)
        mask = torch.cat((mask, mask.new_ones(B, max_new_tokens)), 1)
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        if cache is None and use_cache:
            cache = self.new_cache(B, T + max_new_tokens, steps=steps)
        out = self(input_ids, attention_mask, steps, None, cache)  # positions count real tokens
        for t in range(T, T + max_new_tokens):
            nxt = self.lm_head(out.step_hidden[-1][:, -1]).argmax(-1)  # the last position only
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            ids[:, t] = nxt
            if t == T + max_new_tokens - 1:
                break
            if cache is not None:
                out = self(nxt[:, None], None, steps, None, cache)
            else:
                out = self(ids[:, :t + 1], mask[:, :t + 1], steps, None, None)
        return ids

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def init_weights(model: OuroForCausalLM, std: float = 0.02, seed: int | None = None) -> OuroForCausalLM:
    """Seeded normal init for new models (norms at 1, gate bias at 0)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


__all__ = ["OuroConfig", "ConfigError", "OuroForCausalLM", "LoopOutput", "KVCache", "Context",
           "exit_distribution", "init_weights"]
