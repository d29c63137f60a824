"""FLOPs and KV-cache bytes of a looped model, per token and per loop step.

Convention: one multiply-add is 2 FLOPs; only matmuls are counted (norms, rope,
softmax and SwiGLU's elementwise work are < 1% at Ouro's sizes and left out).
A token that runs `s` steps and reads the LM head `h` times at context length
`ctx` (keys it attends to, itself included) costs

    s * (layer_flops + attn_flops_per_ctx * ctx + gate_flops) + h * head_flops

Exit strategies charge `h` for the signals they read: a gate-only rule reads the
head once (for the token it emits); a KL or confidence rule reads it at every step
it checks. Nothing here is assumed: the harness counts what ran.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelCost:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    steps: int
    tied: bool = False

    @classmethod
    def from_config(cls, cfg) -> ModelCost:
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
                   cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                   cfg.vocab_size, cfg.total_ut_steps, cfg.tie_word_embeddings)

    # -- parameters
    @property
    def layer_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        return attn + mlp + 4 * self.hidden  # + four RMSNorm weights

    @property
    def params(self) -> int:
        embed = self.vocab * self.hidden
        head = 0 if self.tied else self.vocab * self.hidden
        return embed + head + self.layers * self.layer_params + self.hidden + (self.hidden + 1)

    # -- FLOPs per token
    @property
    def layer_flops(self) -> int:
        """Matmul FLOPs of one pass through the layer stack, per token (excludes attention scores)."""
        return 2 * self.layers * (self.layer_params - 4 * self.hidden)

    @property
    def attn_flops_per_ctx(self) -> int:
        """Attention-score FLOPs per step per key attended: QK^T and AV over all layers."""
        return 4 * self.layers * self.heads * self.head_dim

    @property
    def head_flops(self) -> int:
        """One LM-head readout (full-vocabulary logits) for one token."""
        return 2 * self.hidden * self.vocab

    @property
    def gate_flops(self) -> int:
        return 2 * self.hidden

    def step_flops(self, ctx: float) -> float:
        """One loop step for one token at context length `ctx` (gate included, head not)."""
        return self.layer_flops + self.attn_flops_per_ctx * ctx + self.gate_flops

    def token_flops(self, steps: float, ctx: float, readouts: float = 1) -> float:
        """A token that runs `steps` steps and reads the LM head `readouts` times."""
        return steps * self.step_flops(ctx) + readouts * self.head_flops

    def sequence_flops(self, length: int, steps: float, readouts: float = 1, past: int = 0) -> float:
        """All tokens of a causal sequence of `length` new tokens after `past` cached ones,
        every token running `steps` steps: attention context grows 1..length."""
        ctx_sum = length * past + length * (length + 1) / 2
        return (steps * (length * (self.layer_flops + self.gate_flops) + self.attn_flops_per_ctx * ctx_sum)
                + length * readouts * self.head_flops)

    # -- memory
    def kv_bytes_per_step(self, dtype="bfloat16") -> int:
        """KV-cache bytes one token adds for one loop step (all layers, K and V)."""
        name = str(dtype).removeprefix("torch.")
        return 2 * self.layers * self.kv_heads * self.head_dim * DTYPE_BYTES[name]

    def kv_bytes(self, tokens: int, steps: int | None = None, dtype="bfloat16", shared: bool = False) -> int:
        """KV cache of `tokens` positions: one slot per (step, layer), or one per layer
        when all steps share the last step's cache (`shared`)."""
        slots = 1 if shared else (self.steps if steps is None else steps)
        return tokens * slots * self.kv_bytes_per_step(dtype)

    def weight_bytes(self, dtype="bfloat16") -> int:
        return self.params * DTYPE_BYTES[str(dtype).removeprefix("torch.")]


OURO_1_4B = ModelCost(hidden=2048, intermediate=5632, layers=24, heads=16, kv_heads=16, head_dim=128,
                      vocab=49152, steps=4)
OURO_2_6B = ModelCost(hidden=2048, intermediate=5632, layers=48, heads=16, kv_heads=16, head_dim=128,
                      vocab=49152, steps=4)
