"""Train a small looped Ouro model on the toy task family with Ouro's two-stage objective.

Stage I (model and gate together), per item with per-step answer losses L_t and the
gate's exit distribution p_t (`ouro_lab.model.exit_distribution`):

    loss = sum_t p_t L_t - beta * H(p)                    Ouro's entropy-regularised objective
         + per_step_weight * mean_t L_t                   collapse guard (see below)
         + aux_weight * mean_t CE(running values, eos)    optional auxiliary supervision

The collapse guard: with the first two terms alone the gate sends its mass to step 1
within ~100 updates, the later steps then get almost no gradient and stop learning
(measured on this task, see ../shared/notes/looped-toy-training.md). The per-step term
keeps every step trained whatever the gate does. The auxiliary term asks every position
to predict the running value after the operations read so far (and the answer token to
predict eos); it is used in training only and speeds learning.

A curriculum draws k uniform in 1..kmax; kmax starts small and grows by one whenever
step-R accuracy on held-out *dev* items at k = kmax passes `advance_at`. Driving it by
training accuracy advances on memorised easy items.

Stage II (language model frozen, the gate alone) fits the gate with binary cross-entropy
to a "keep looping" label built from the per-step losses, sigmoid(k (improvement - gamma)):

- `label: forward` (default): improvement = L_t - L_{t+1}, the gain the *next* step would
  bring. It exits at step t as soon as further steps stop helping, including at step 1.
- `label: paper`: improvement = L_{t-1} - L_t (the Ouro paper's form, with L_0 = ln V, the
  loss of a uniform guess). Step 1 always improves on nothing, so the gate almost never
  exits at step 1 and easy items pay for a step they do not need.

Measured on the demo model (LM frozen, gate re-initialised to zero, 300 gate updates each,
held-out test items, threshold q = 0.5), mean exit step for k = 1 / 4 / 8 and accuracy at
exit over all items: `forward` 1.05 / 2.56 / 3.62, 0.94; `paper` 2.63 / 3.76 / 2.30, 0.72
(the paper form keeps easy items looping and lets the hardest ones out early).

Runs are seeded and resumable: `work_dir/state.pt` holds model, optimiser, data generator
and curriculum state; `work_dir/training_log.jsonl` one row per update.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ouro_lab import toy
from ouro_lab.errors import OuroLabError
from ouro_lab.files import atomic_path, atomic_write
from ouro_lab.model import OuroConfig, OuroForCausalLM, exit_distribution, init_weights


class RecipeError(OuroLabError):
    """A training recipe that does not validate."""


# --------------------------------------------------------------------------- recipe


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    hidden_size: int = Field(128, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(352, gt=0)
    total_ut_steps: int = Field(4, ge=2)
    tie_word_embeddings: bool = True
    init_std: float = Field(0.02, gt=0)


class DataSpec(_Strict):
    kmax_start: int = Field(3, ge=1)
    kmax_final: int = Field(12, ge=1, le=30)
    dev_per_level: int = Field(256, gt=0)
    test_per_level: int = Field(34, gt=0)
    test_seed: int = 1234


class Stage1Spec(_Strict):
    max_steps: int = Field(3000, ge=0)
    batch_size: int = Field(256, gt=0)
    lr: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    beta: float = Field(0.1, ge=0)
    per_step_weight: float = Field(0.5, ge=0)
    aux_weight: float = Field(0.5, ge=0)
    eval_every: int = Field(25, gt=0)
    advance_at: float = Field(0.9, gt=0, le=1)
    stop_at: float | None = Field(0.95, gt=0, le=1)


class Stage2Spec(_Strict):
    steps: int = Field(300, ge=0)
    batch_size: int = Field(256, gt=0)
    lr: float = Field(1e-2, gt=0)
    k: float = Field(50.0, gt=0)
    gamma: float = 0.005
    label: Literal["forward", "paper"] = "forward"


class TrainRecipe(_Strict):
    seed: int = 0
    threads: int | None = Field(None, gt=0)
    work_dir: str = "results/train-demo"
    export_dir: str | None = None
    save_every: int = Field(100, gt=0)
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    stage1: Stage1Spec = Stage1Spec()
    stage2: Stage2Spec = Stage2Spec()
    source: str = Field("<recipe>", exclude=True)


def load_recipe(path: str | Path) -> TrainRecipe:
    """Parse and validate a YAML recipe; every problem is reported at once, on one line."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe not found; pass a YAML file such as recipes/train-demo.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: must be a YAML mapping of fields (seed, model, stage1, ...)")
    recipe = recipe_from_dict(raw, source=str(path))
    # relative folders are the recipe's, as a sweep recipe's paths are: not the shell's
    for name in ("work_dir", "export_dir"):
        if getattr(recipe, name) is not None:
            setattr(recipe, name, str((path.parent / getattr(recipe, name)).resolve()))
    return recipe


def recipe_from_dict(raw: dict, source: str = "<recipe>") -> TrainRecipe:
    try:
        recipe = TrainRecipe(**raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = "unknown field, remove it" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"field {loc}: {msg}")
        raise RecipeError(f"{source}: {'; '.join(problems)}") from None
    if recipe.data.kmax_start > recipe.data.kmax_final:
        raise RecipeError(f"{source}: field data.kmax_start ({recipe.data.kmax_start}) must be "
                          f"<= data.kmax_final ({recipe.data.kmax_final})")
    if recipe.model.hidden_size % recipe.model.num_attention_heads:
        raise RecipeError(f"{source}: field model.hidden_size must be a multiple of "
                          "model.num_attention_heads")
    recipe.source = source
    return recipe


def build_model(spec: ModelSpec, seed: int, kmax: int) -> OuroForCausalLM:
    cfg = OuroConfig(vocab_size=len(toy.VOCAB), hidden_size=spec.hidden_size,
                     intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
                     num_attention_heads=spec.num_attention_heads, total_ut_steps=spec.total_ut_steps,
                     max_position_embeddings=max(64, kmax + 8), tie_word_embeddings=spec.tie_word_embeddings,
                     bos_token_id=None, eos_token_id=toy.TOKEN_ID[toy.EOS],
                     pad_token_id=toy.TOKEN_ID[toy.PAD])
    return init_weights(OuroForCausalLM(cfg), std=spec.init_std, seed=seed)


# --------------------------------------------------------------------------- losses


def answer_losses(model: OuroForCausalLM, batch: dict) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Per-step answer loss L (R, B), the gate logits at the answer position (R, B), and the
    forward's LoopOutput."""
    out = model(batch["input_ids"], batch["attention_mask"])
    R, B = out.step_hidden.shape[:2]
    idx = batch["answer_pos"][None, :, None, None].expand(R, B, 1, out.step_hidden.shape[-1])
    h = out.step_hidden.gather(2, idx)[:, :, 0]                       # (R, B, H)
    logits = model.lm_head(h)                                          # (R, B, V)
    L = F.cross_entropy(logits.flatten(0, 1), batch["answer"].repeat(R), reduction="none").view(R, B)
    gates = out.gate_logits.gather(2, batch["answer_pos"][None, :, None].expand(R, B, 1))[:, :, 0]
    return L, gates, out


def stage1_loss(model: OuroForCausalLM, batch: dict, spec: Stage1Spec) -> tuple[torch.Tensor, dict]:
    L, gates, out = answer_losses(model, batch)
    pdf, _ = exit_distribution(gates)                                  # (R, B)
    expected = (pdf * L).sum(0).mean()
    entropy = -(pdf * pdf.clamp_min(1e-12).log()).sum(0).mean()
    per_step = L.mean()
    loss = expected - spec.beta * entropy + spec.per_step_weight * per_step
    aux = torch.zeros(())
    if spec.aux_weight > 0:
        targets = batch["lm_targets"]                                  # (B, T), -100 ignored
        logits = out.all_logits()                                      # (R, B, T, V), V is tiny
        R = logits.shape[0]
        aux = F.cross_entropy(logits.flatten(0, 2), targets.repeat(R, 1).flatten(), ignore_index=-100)
        loss = loss + spec.aux_weight * aux
    stats = {"loss": loss.item(), "expected": expected.item(), "entropy": entropy.item(),
             "aux": aux.item(), **{f"L{t + 1}": L[t].mean().item() for t in range(L.shape[0])},
             **{f"p{t + 1}": pdf[t].mean().item() for t in range(L.shape[0])}}
    return loss, stats


def gate_targets(L: torch.Tensor, k: float, gamma: float, label: str, vocab_size: int) -> torch.Tensor:
    """Exit targets (R-1, B) for the gate at steps 1..R-1 from per-step losses L (R, B).

    The "keep looping" weight is sigmoid(k (improvement - gamma)); the gate predicts the
    exit probability, so its target is one minus that. The last step always exits."""
    if label == "forward":
        improvement = L[:-1] - L[1:]                                   # gain of the next step
    elif label == "paper":
        prev = torch.cat((torch.full_like(L[:1], math.log(vocab_size)), L[:-2]))
        improvement = prev - L[:-1]                                    # gain of this step
    else:
        raise ValueError(f"label must be 'forward' or 'paper', got {label!r}")
    return 1 - torch.sigmoid(k * (improvement - gamma))


def stage2_loss(model: OuroForCausalLM, batch: dict, spec: Stage2Spec) -> tuple[torch.Tensor, dict]:
    with torch.no_grad():
        L, _, out = answer_losses(model, batch)
        R, B = L.shape
        idx = batch["answer_pos"][None, :, None, None].expand(R, B, 1, out.step_hidden.shape[-1])
        h = out.step_hidden.gather(2, idx)[:, :, 0]                   # (R, B, H), detached
        target = gate_targets(L, spec.k, spec.gamma, spec.label, model.config.vocab_size)
    gates = model.gate(h)                                              # (R, B), only the gate has grad
    loss = F.binary_cross_entropy_with_logits(gates[:-1], target)
    stats = {"loss": loss.item(), **{f"exit_target{t + 1}": target[t].mean().item() for t in range(R - 1)},
             **{f"lambda{t + 1}": torch.sigmoid(gates[t]).mean().item() for t in range(R - 1)}}
    return loss, stats


def make_batch(n: int, kmax: int, generator: torch.Generator) -> dict:
    items = toy.sample_items(n, (1, kmax), "train", generator)
    batch = toy.encode_batch(items)
    targets = batch["running"].clone()
    ar = torch.arange(n)
    targets[ar, batch["answer_pos"]] = batch["answer"]
    targets[ar, batch["eos_pos"]] = toy.TOKEN_ID[toy.EOS]
    batch["lm_targets"] = targets
    return batch


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def per_step_predictions(model: OuroForCausalLM, items: list[toy.Item], batch_size: int = 512):
    """Per-step argmax at the answer position (R, N) (token ids), the answers (N,), and the
    gate logits at the answer position (R, N)."""
    preds, answers, gates = [], [], []
    for i in range(0, len(items), batch_size):
        batch = toy.encode_prompts(items[i:i + batch_size])
        out = model(batch["input_ids"], batch["attention_mask"])
        R, B = out.step_hidden.shape[:2]
        idx = batch["answer_pos"][None, :, None, None].expand(R, B, 1, out.step_hidden.shape[-1])
        h = out.step_hidden.gather(2, idx)[:, :, 0]
        preds.append(model.lm_head(h).argmax(-1))
        gates.append(out.gate_logits.gather(2, batch["answer_pos"][None, :, None].expand(R, B, 1))[:, :, 0])
        answers.append(batch["answer"])
    return torch.cat(preds, 1), torch.cat(answers), torch.cat(gates, 1)


def threshold_exit(gate_logits: torch.Tensor, q: float = 0.5) -> torch.Tensor:
    """Ouro's Q-exit: the first step (0-based) whose cumulative exit probability reaches q."""
    _, cdf = exit_distribution(gate_logits)
    return (cdf >= q).float().argmax(0)


def evaluate(model: OuroForCausalLM, items: list[toy.Item], q: float = 0.5) -> dict:
    """Per-step accuracy, mean exit step (1-based) and accuracy at exit under the threshold
    rule, by difficulty k and overall."""
    preds, answers, gates = per_step_predictions(model, items)
    correct = (preds == answers[None]).float()                        # (R, N)
    exit_step = threshold_exit(gates, q)                               # (N,)
    at_exit = correct.gather(0, exit_step[None])[0]
    ks = torch.tensor([it.k for it in items])
    by_k = {}
    for k in sorted(set(ks.tolist())):
        m = ks == k
        accs = [round(v, 6) for v in correct[:, m].mean(1).tolist()]
        by_k[str(k)] = {"n": int(m.sum()), "acc_per_step": accs,
                        "mean_exit_step": round(float(exit_step[m].float().mean() + 1), 6),
                        "acc_at_exit": round(float(at_exit[m].mean()), 6)}
    return {"q": q, "n": len(items), "acc_per_step": [round(v, 6) for v in correct.mean(1).tolist()],
            "mean_exit_step": round(float(exit_step.float().mean() + 1), 6),
            "acc_at_exit": round(float(at_exit.mean()), 6), "by_difficulty": by_k}


# --------------------------------------------------------------------------- the loop


def _save_state(path: Path, state: dict) -> None:
    with atomic_path(path, "training state") as tmp:
        torch.save(state, tmp)


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                    console=Console(stderr=True), disable=not enabled, transient=False)


def train(recipe: TrainRecipe, resume: bool = True, progress: bool = True) -> dict:
    """Run Stage I then Stage II as the recipe says; returns the final evaluation summary.

    With `resume`, a `state.pt` left in `work_dir` by an interrupted run is picked up where it
    stopped (same seed, same batches), so an interrupted run ends with the same weights."""
    threads = torch.get_num_threads()
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    try:
        return _train(recipe, resume, progress)
    finally:
        torch.set_num_threads(threads)


class _Loop:
    """The state one training run carries through both stages: model, optimisers, data
    generator, curriculum state `st`, the log file and the progress bars."""

    def __init__(self, recipe: TrainRecipe, state_path: Path):
        torch.manual_seed(recipe.seed)
        s1, s2 = recipe.stage1, recipe.stage2
        self.recipe, self.state_path = recipe, state_path
        self.model = build_model(recipe.model, recipe.seed, recipe.data.kmax_final)
        self.opt1 = torch.optim.AdamW(self.model.parameters(), lr=s1.lr, betas=(0.9, 0.98),
                                      weight_decay=s1.weight_decay)
        self.opt2 = torch.optim.AdamW(self.model.model.early_exit_gate.parameters(), lr=s2.lr,
                                      weight_decay=0.0)
        self.gen = torch.Generator().manual_seed(recipe.seed)
        self.st = {"stage": 1, "step": 0, "kmax": recipe.data.kmax_start, "elapsed": 0.0, "done1": False,
                   "recipe": recipe.model_dump()}
        self.log = self.bar = None
        self.t0 = 0.0

    def restore(self, log_path: Path, work: Path) -> None:
        """Pick up the state an interrupted run left (same recipe only); drop log rows after it."""
        saved = torch.load(self.state_path, weights_only=True)
        where = ("work_dir", "export_dir")  # where the run lives is not what it computes (a moved checkout)
        if {k: v for k, v in saved["recipe"].items() if k not in where} != \
                {k: v for k, v in self.st["recipe"].items() if k not in where}:
            raise RecipeError(f"{self.state_path}: left by a different recipe; delete {work} or restore "
                              f"the recipe it was made with")
        self.model.load_state_dict(saved["model"])
        self.opt1.load_state_dict(saved["opt1"])
        self.opt2.load_state_dict(saved["opt2"])
        self.gen.set_state(saved["gen"])
        self.st = st = saved["st"]
        if log_path.is_file():  # drop rows written after the saved state
            last = (st["stage"], st["step"])
            kept = [r for r in toy.read_jsonl(log_path) if (r["stage"], r["step"]) <= last]
            toy.write_jsonl(kept, log_path)

    def checkpoint(self) -> None:
        _save_state(self.state_path, {"model": self.model.state_dict(), "opt1": self.opt1.state_dict(),
                                      "opt2": self.opt2.state_dict(), "gen": self.gen.get_state(),
                                      "st": self.st, "recipe": self.st["recipe"]})

    def write(self, row: dict) -> None:
        self.log.write(json.dumps(row) + "\n")
        self.log.flush()


def _train(recipe: TrainRecipe, resume: bool, progress: bool) -> dict:
    work = Path(recipe.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    state_path, log_path = work / "state.pt", work / "training_log.jsonl"
    data = recipe.data
    loop = _Loop(recipe, state_path)
    if resume and state_path.is_file():
        loop.restore(log_path, work)
    elif log_path.is_file():
        log_path.unlink()
    # dev set at level k: the last dev_per_level held-out dev items of levels <= k (k = 2, 3 have
    # fewer held-out items than that, so their sets are topped up with easier levels)
    dev_items = toy.test_items(data.dev_per_level, data.kmax_final, recipe.seed + 1, split="dev")
    dev = {k: [it for it in dev_items if it.k <= k][-data.dev_per_level:]
           for k in range(1, data.kmax_final + 1)}
    loop.t0 = time.perf_counter() - loop.st["elapsed"]
    with open(log_path, "a") as log, _progress(progress) as bar:
        loop.log, loop.bar = log, bar
        _stage1(loop, dev)
        _stage2(loop)
        loop.st["elapsed"] = time.perf_counter() - loop.t0
        loop.checkpoint()
    model, st = loop.model, loop.st
    model.requires_grad_(True)
    model.eval()
    items = toy.test_items(data.test_per_level, data.kmax_final, data.test_seed)
    summary = {"seed": recipe.seed, "stage1_steps": st.get("stage1_steps", 0),
               "stage2_steps": recipe.stage2.steps,
               "final_kmax": st["kmax"], "train_time_s": round(st["elapsed"], 1),
               "stage1_time_s": st.get("stage1_time_s"), "parameters": model.num_parameters(),
               "test": evaluate(model, items)}
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if recipe.export_dir:
        export(model, recipe, summary, Path(recipe.export_dir), log_path)
    return summary


def _stage1(loop: _Loop, dev: dict) -> None:
    """Stage I: model and gate together, with the curriculum on held-out dev accuracy."""
    recipe, model, opt1, st = loop.recipe, loop.model, loop.opt1, loop.st
    s1, data = recipe.stage1, recipe.data
    task = loop.bar.add_task("stage I ", total=s1.max_steps, completed=st["step"] if st["stage"] == 1
                             else s1.max_steps, info="")
    model.train()
    while st["stage"] == 1 and st["step"] < s1.max_steps and not st["done1"]:
        lr = s1.lr * min(1.0, (st["step"] + 1) / max(1, s1.warmup_steps))
        for g in opt1.param_groups:
            g["lr"] = lr
        batch = make_batch(s1.batch_size, st["kmax"], loop.gen)
        loss, stats = stage1_loss(model, batch, s1)
        opt1.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), s1.grad_clip)
        opt1.step()
        st["step"] += 1
        row = {"stage": 1, "step": st["step"], "kmax": st["kmax"], "lr": lr,
               "grad_norm": round(gnorm.item(), 5), **{k: round(v, 6) for k, v in stats.items()}}
        if st["step"] % s1.eval_every == 0 or st["step"] == s1.max_steps:
            model.eval()
            acc = evaluate(model, dev[st["kmax"]])["acc_per_step"]
            model.train()
            row["dev_k"], row["dev_acc_per_step"] = st["kmax"], acc
            if acc[-1] >= s1.advance_at and st["kmax"] < data.kmax_final:
                st["kmax"] += 1
            elif st["kmax"] == data.kmax_final and s1.stop_at is not None and acc[-1] >= s1.stop_at:
                st["done1"] = True
        st["elapsed"] = time.perf_counter() - loop.t0
        row["time_s"] = round(st["elapsed"], 2)
        loop.write(row)
        info = f"loss {stats['loss']:.3f} kmax {st['kmax']}"
        if "dev_k" in row:
            info += f" dev@k{row['dev_k']} {row['dev_acc_per_step'][-1]:.2f}"
        loop.bar.update(task, completed=st["step"], info=info)
        if st["step"] % recipe.save_every == 0:
            loop.checkpoint()
    if st["stage"] == 1:
        st.update(stage=2, stage1_steps=st["step"], step=0)
        st["stage1_time_s"] = round(time.perf_counter() - loop.t0, 2)
        loop.checkpoint()


def _stage2(loop: _Loop) -> None:
    """Stage II: the language model frozen, the gate alone."""
    recipe, model, opt2, st = loop.recipe, loop.model, loop.opt2, loop.st
    s2 = recipe.stage2
    task2 = loop.bar.add_task("stage II", total=s2.steps, completed=st["step"], info="")
    model.requires_grad_(False)
    model.model.early_exit_gate.requires_grad_(True)
    model.eval()
    while st["step"] < s2.steps:
        batch = make_batch(s2.batch_size, recipe.data.kmax_final, loop.gen)
        loss, stats = stage2_loss(model, batch, s2)
        opt2.zero_grad(set_to_none=True)
        loss.backward()
        opt2.step()
        st["step"] += 1
        st["elapsed"] = time.perf_counter() - loop.t0
        row = {"stage": 2, "step": st["step"], **{k: round(v, 6) for k, v in stats.items()},
               "time_s": round(st["elapsed"], 2)}
        loop.write(row)
        loop.bar.update(task2, completed=st["step"], info=f"bce {stats['loss']:.4f}")
        if st["step"] % recipe.save_every == 0:
            loop.checkpoint()


# --------------------------------------------------------------------------- export


def export(model: OuroForCausalLM, recipe: TrainRecipe, summary: dict, out: Path, log_path: Path) -> Path:
    """The published layout (config.json + model.safetensors), the tokenizer, the training
    log, eval.json and a model card."""
    from ouro_lab.loading import save_model

    save_model(model, out)
    toy.save_tokenizer(out)
    with atomic_path(out / "training_log.jsonl") as tmp:
        shutil.copyfile(log_path, tmp)
    atomic_write(out / "eval.json", json.dumps(summary, indent=2) + "\n")
    atomic_write(out / "MODEL_CARD.md", model_card(recipe, summary))
    return out


def model_card(recipe: TrainRecipe, summary: dict) -> str:
    m, t = recipe.model, summary["test"]
    R = m.total_ut_steps
    head = " | ".join(f"step {r + 1}" for r in range(R))
    rows = []
    for k, v in t["by_difficulty"].items():
        accs = " | ".join(f"{a:.3f}" for a in v["acc_per_step"])
        rows.append(f"| {k} | {v['n']} | {accs} | {v['mean_exit_step']:.2f} | {v['acc_at_exit']:.3f} |")
    all_accs = " | ".join(f"{a:.3f}" for a in t["acc_per_step"])
    rows.append(f"| all | {t['n']} | {all_accs} | {t['mean_exit_step']:.2f} | {t['acc_at_exit']:.3f} |")
    return f"""# loop-demo: a tiny looped Ouro model trained by ouro-lab

A {m.num_hidden_layers}-layer Ouro model (hidden {m.hidden_size}, {m.num_attention_heads} heads, SwiGLU
{m.intermediate_size}, {R} loop steps, tied embeddings: {summary['parameters']:,} parameters, float32)
trained on the toy task family of `ouro_lab/toy.py`: compose k operations over Z_10 written
in the input (`7 *3 +3 +3 =` -> `7`). Difficulty is k (1..{recipe.data.kmax_final}); chance is 0.10.
The vocabulary is 18 words (`<pad>`, `<eos>`, digits, `+1 +3 *3 *7`, `=`, `<unk>`); the
tokenizer is a WordLevel tokenizer that `transformers.AutoTokenizer` loads from this folder.

## Reproduce

    ouro-lab train {recipe.source}

seed {recipe.seed} (in the recipe), CPU threads: {recipe.threads or 'torch default'}. Training took
{summary['train_time_s'] / 60:.1f} min of wall time on a shared 2-core CPU
(Stage I {summary['stage1_steps']} updates with the curriculum reaching kmax {summary['final_kmax']},
Stage II {summary['stage2_steps']} gate-only updates). Floating-point results differ across
CPUs and torch builds, so a rerun elsewhere gives a close but not bit-identical model.

## Objective

Stage I: expected answer loss under the gate's exit distribution minus {recipe.stage1.beta} x its
entropy, plus {recipe.stage1.per_step_weight} x the per-step loss averaged over steps (the guard
against the gate collapsing onto step 1), plus {recipe.stage1.aux_weight} x an auxiliary running-value
loss (training only). Curriculum: k uniform in 1..kmax, kmax grows when held-out dev accuracy
at step {R} and k = kmax passes {recipe.stage1.advance_at}.
Stage II: model frozen, gate trained with BCE to exit targets 1 - sigmoid({recipe.stage2.k:g}
(improvement - {recipe.stage2.gamma})), label form `{recipe.stage2.label}`.

## Measured on held-out test items (the `loop_demo_mc` task's {t['n']} documents)

Accuracy is the argmax over the vocabulary at the answer position after each step; the
exit step is Ouro's threshold rule (first step whose cumulative exit probability >= {t['q']}).

| k | n | {head} | mean exit step | acc at exit |
|---|---|{'---|' * R}---|---|
{chr(10).join(rows)}

The same numbers are in `eval.json`; `tests/test_demo_model.py` recomputes them from the
weights. `training_log.jsonl` has one row per update (losses per step, exit mass per step,
curriculum level, dev accuracy every {recipe.stage1.eval_every} updates).
"""


def main(recipe_path: str | Path, resume: bool = True, progress: bool = True) -> dict:
    recipe = load_recipe(recipe_path)
    return train(recipe, resume=resume, progress=progress)
