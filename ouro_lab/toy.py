"""A synthetic task family where more loop steps genuinely help: composing operations over Z_10.

An item is a start digit followed by k operations written in the input, then `=`; the answer
is the next token, the composition applied to the start digit:

    7 *3 +3 +3 *7 =  ->  9        (7*3 = 21 -> 1, +3 -> 4, +3 -> 7, *7 = 49 -> 9; mod 10)

Difficulty is k, the number of operations. Every operation is a bijection of Z_10, so the
answer is uniform over the ten digits (chance is 0.10) and cannot be guessed from the input
length. A looped model with a fixed depth per step can fold only so many operations per
step, so harder items need more steps.

The split is by content: every item is hashed (blake2b of its text), bucket 0 of 8 is the
test split (the demo lm-eval tasks), bucket 1 the dev split (drives the training
curriculum), the other six buckets are trained on. k = 1 has only 40 items (the operation
table itself); it is trained on and reused as its own test level.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ouro_lab.files import atomic_write

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
DIGITS = [str(d) for d in range(10)]
OPS = {"+1": (1, 1), "+3": (1, 3), "*3": (3, 0), "*7": (7, 0)}  # op(x) = (a*x + b) mod 10
OP_NAMES = list(OPS)
EQ = "="
VOCAB = [PAD, EOS, *DIGITS, *OP_NAMES, EQ, UNK]  # 0 pad, 1 eos, 2..11 digits, 12..15 ops, 16 =, 17 unk
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}
DIGIT0 = TOKEN_ID["0"]
OP0 = TOKEN_ID[OP_NAMES[0]]
SPLITS = ("train", "dev", "test")
N_BUCKETS = 8


def apply_op(op: str, x: int) -> int:
    a, b = OPS[op]
    return (a * x + b) % 10


def answer(x: int, ops: list[str]) -> int:
    for op in ops:
        x = apply_op(op, x)
    return x


def prompt_text(x: int, ops: list[str]) -> str:
    return " ".join([str(x), *ops, EQ])


def split_of(text: str, k: int) -> str:
    """`train`, `dev` or `test`, from a hash of the item's text (k = 1 is always `train`)."""
    if k <= 1:
        return "train"
    bucket = hashlib.blake2b(text.encode(), digest_size=8).digest()[0] % N_BUCKETS
    return {0: "test", 1: "dev"}.get(bucket, "train")


@dataclass(frozen=True)
class Item:
    x: int
    ops: tuple[str, ...]

    @property
    def k(self) -> int:
        return len(self.ops)

    @property
    def prompt(self) -> str:
        return prompt_text(self.x, list(self.ops))

    @property
    def answer(self) -> int:
        return answer(self.x, list(self.ops))

    @property
    def split(self) -> str:
        return split_of(self.prompt, self.k)

    def running(self) -> list[int]:
        """The value after 0, 1, ..., k operations."""
        vals, x = [self.x], self.x
        for op in self.ops:
            x = apply_op(op, x)
            vals.append(x)
        return vals


def sample_items(n: int, k: int | tuple[int, int], split: str, generator: torch.Generator) -> list[Item]:
    """`n` items of the given split with k fixed or uniform in the inclusive range (lo, hi).

    Deterministic given the generator state: candidates are drawn in batches and rejected
    by split, so the same seed gives the same items on every machine."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    lo, hi = (k, k) if isinstance(k, int) else k
    out: list[Item] = []
    while len(out) < n:
        m = max(2 * (n - len(out)), 64)
        ks = torch.randint(lo, hi + 1, (m,), generator=generator)
        xs = torch.randint(0, 10, (m,), generator=generator)
        ops = torch.randint(0, len(OPS), (m, hi), generator=generator)
        for i in range(m):
            kk = int(ks[i])
            item = Item(int(xs[i]), tuple(OP_NAMES[j] for j in ops[i, :kk].tolist()))
            if item.split == split or (kk == 1 and split != "train" and lo == hi == 1):
                out.append(item)
                if len(out) == n:
                    break
    return out


def all_items(k: int, split: str) -> list[Item]:
    """Every item of difficulty k in a split, in a fixed order (small k only: 10 * 4^k)."""
    if k > 6:
        raise ValueError("all_items enumerates 10 * 4**k items; use sample_items for k > 6")
    items = []
    for code in range(10 * len(OPS) ** k):
        x, rest = code % 10, code // 10
        ops = []
        for _ in range(k):
            ops.append(OP_NAMES[rest % len(OPS)])
            rest //= len(OPS)
        item = Item(x, tuple(ops))
        if item.split == split or (k == 1 and split != "train"):
            items.append(item)
    return items


def test_items(per_level: int, kmax: int, seed: int, split: str = "test") -> list[Item]:
    """A fixed set of held-out items: up to `per_level` distinct items for every k in 1..kmax."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(1, kmax + 1):
        if 10 * len(OPS) ** k <= 64 * per_level:  # small levels: enumerate and subsample
            pool = all_items(k, split)
            idx = torch.randperm(len(pool), generator=g)[:per_level].tolist()
            out.extend(pool[i] for i in sorted(idx))
        else:
            seen, level = set(), []
            while len(level) < per_level:
                for item in sample_items(per_level, k, split, g):
                    if item.prompt not in seen and len(level) < per_level:
                        seen.add(item.prompt)
                        level.append(item)
            out.extend(level)
    return out


# --------------------------------------------------------------------------- tensors


def encode_batch(items: list[Item], length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded training tensors for `x op_1 .. op_k = answer <eos>`.

    input_ids (B, T); answer_pos (B,) the index of `=` (its next token is the answer);
    answer (B,) the answer's token id; running (B, T) the token id of the running value
    after the operations read so far at positions 0..k (-100 elsewhere), for the
    auxiliary loss; eos_pos (B,) the index of the answer token (its next token is eos)."""
    T = length or max(it.k for it in items) + 4
    B = len(items)
    ids = torch.full((B, T), TOKEN_ID[PAD], dtype=torch.long)
    running = torch.full((B, T), -100, dtype=torch.long)
    answer_pos = torch.empty(B, dtype=torch.long)
    ans = torch.empty(B, dtype=torch.long)
    for b, it in enumerate(items):
        toks = [TOKEN_ID[str(it.x)], *(TOKEN_ID[o] for o in it.ops), TOKEN_ID[EQ]]
        a = DIGIT0 + it.answer
        ids[b, : len(toks) + 2] = torch.tensor([*toks, a, TOKEN_ID[EOS]])
        running[b, : it.k + 1] = torch.tensor([DIGIT0 + v for v in it.running()])
        answer_pos[b] = it.k + 1
        ans[b] = a
    mask = (ids != TOKEN_ID[PAD]).long()
    return {"input_ids": ids, "attention_mask": mask, "answer_pos": answer_pos, "answer": ans,
            "running": running, "eos_pos": answer_pos + 1}


def encode_prompts(items: list[Item]) -> dict[str, torch.Tensor]:
    """Prompts only (`x op_1 .. op_k =`), right-padded; answer_pos is each prompt's last token."""
    batch = encode_batch(items)
    ids = batch["input_ids"].clone()
    pos = torch.arange(ids.shape[1])[None]
    keep = pos <= batch["answer_pos"][:, None]
    ids[~keep] = TOKEN_ID[PAD]
    width = int(batch["answer_pos"].max()) + 1
    return {"input_ids": ids[:, :width], "attention_mask": keep[:, :width].long(),
            "answer_pos": batch["answer_pos"], "answer": batch["answer"]}


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer():
    """A WordLevel tokenizer over VOCAB (whitespace-split), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(TOKEN_ID), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS,
                                   unk_token=UNK, model_max_length=64, padding_side="left",
                                   clean_up_tokenization_spaces=False)


def save_tokenizer(path: str | Path) -> Path:
    """Write tokenizer.json + tokenizer_config.json into a checkpoint folder. The config names
    the class `PreTrainedTokenizerFast`, which every transformers release since 4.x loads (5.x
    writes its own `TokenizersBackend`, unknown to 4.x)."""
    path = Path(path)
    build_tokenizer().save_pretrained(str(path))
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    atomic_write(cfg_file, json.dumps(cfg, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------- demo tasks


def task_docs(items: list[Item]) -> list[dict]:
    return [{"id": f"{i:04d}", "prompt": it.prompt, "answer": str(it.answer), "label": it.answer,
             "difficulty": it.k} for i, it in enumerate(items)]


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def items_from_docs(docs: list[dict]) -> list[Item]:
    out = []
    for d in docs:
        toks = d["prompt"].split()
        out.append(Item(int(toks[0]), tuple(toks[1:-1])))
    return out


def write_demo_tasks(data_dir: str | Path, per_level: int = 50, kmax: int = 8, seed: int = 1234,
                     gen_per_level: int = 10) -> tuple[Path, Path]:
    """Write the demo lm-eval tasks' data from held-out test items: `loop_demo_mc.jsonl`
    (`per_level` items per k) and `loop_demo_gen.jsonl` (the first `gen_per_level` of each k).
    The items are those `test_items(per_level, kmax, seed)` returns, the ones training
    reports its final accuracy on."""
    docs = task_docs(test_items(per_level, kmax, seed))
    gen = []
    seen: dict[int, int] = {}
    for d in docs:
        seen[d["difficulty"]] = seen.get(d["difficulty"], 0) + 1
        if seen[d["difficulty"]] <= gen_per_level:
            gen.append(d)
    data_dir = Path(data_dir)
    return (write_jsonl(docs, data_dir / "loop_demo_mc.jsonl"),
            write_jsonl(gen, data_dir / "loop_demo_gen.jsonl"))


if __name__ == "__main__":
    import sys

    for p in write_demo_tasks(sys.argv[1] if len(sys.argv) > 1 else "tasks/data"):
        print(p)
