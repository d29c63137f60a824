"""Tiny local copies of the stock tasks' hub datasets, in the layout `hf download <id>
--repo-type dataset --local-dir <root>/<id>` leaves: a README.md whose `configs:` header
lists each config's split files, and `<config folder>/<split>-00000-of-00001.parquet`.
Rows carry the fields lm-eval's own YAMLs read (shared by test_stock_tasks.py and test_tasks.py)."""

from __future__ import annotations

from pathlib import Path

WORDS = ["one", "two", "three", "four", "red", "blue", "green", "cat", "dog", "yes", "no"]


def write_hub_dataset(folder: Path, configs: dict[str | None, dict[str, list[dict]]], header: bool = True,
                      convert_layout: bool = False) -> Path:
    """configs: {config name (None = the single default config, files under data/): {split: rows}}.
    `header=False` leaves the card without its `configs:` header (files copied by hand);
    `convert_layout` writes `<config>/<split>/0000.parquet` (the hub's refs/convert/parquet)."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        sub = config or "data"
        lines += [f"- config_name: {config or 'default'}", "  data_files:"]
        for split, rows in splits.items():
            if convert_layout:
                (folder / sub / split).mkdir(parents=True, exist_ok=True)
                pd.DataFrame(rows).to_parquet(folder / sub / split / "0000.parquet")
                lines += [f"  - split: {split}", f"    path: {sub}/{split}/*"]
            else:
                (folder / sub).mkdir(parents=True, exist_ok=True)
                pd.DataFrame(rows).to_parquet(folder / sub / f"{split}-00000-of-00001.parquet")
                lines += [f"  - split: {split}", f"    path: {sub}/{split}-*"]
    card = lines + ["---"] if header else ["---", "license: test", "---"]
    (folder / "README.md").write_text("\n".join(card + ["", "local copy for tests", ""]))
    return folder


def _w(i: int) -> str:
    return WORDS[i % len(WORDS)]


def arc_rows(n: int, offset: int = 0) -> list[dict]:
    return [{"id": f"q{i + offset}", "question": f"what is {_w(i + offset)} ?",
             "choices": {"text": ["one", "two", "three", "four"], "label": ["A", "B", "C", "D"]},
             "answerKey": "ABCD"[i % 4]} for i in range(n)]


def hellaswag_rows(n: int, offset: int = 0) -> list[dict]:
    return [{"ind": i + offset, "activity_label": "cat", "ctx_a": f"the {_w(i + offset)} cat is",
             "ctx_b": "a", "ctx": f"the {_w(i + offset)} cat is a",
             "endings": ["red dog", "blue cat and", "green", "yes no yes"], "source_id": "t",
             "split": "val", "split_type": "indomain", "label": str(i % 4)} for i in range(n)]


def piqa_rows(n: int, offset: int = 0) -> list[dict]:
    return [{"goal": f"what is {_w(i + offset)} ?", "sol1": "red cat", "sol2": "blue dog and",
             "label": i % 2} for i in range(n)]


def winogrande_rows(n: int, offset: int = 0) -> list[dict]:
    return [{"sentence": f"the cat and the dog : _ is {_w(i + offset)} .", "option1": "cat",
             "option2": "dog", "answer": "12"[i % 2]} for i in range(n)]


def mmlu_rows(n: int, subject: str, offset: int = 0) -> list[dict]:
    return [{"question": f"what is {_w(i + offset)} ?", "subject": subject,
             "choices": ["one", "two", "three", "four"], "answer": i % 4} for i in range(n)]


def gsm_rows(n: int) -> list[dict]:
    return [{"question": f"what is {_w(a)} plus one ?", "answer": f"one plus {_w(a)} is two .\n#### 2"}
            for a in range(n)]


def mmlu_subjects(group: str | None = None) -> list[str]:
    """mmlu's subjects (the configs of cais/mmlu) as lm-eval's own YAMLs name them, all or
    those of one category group (`mmlu_humanities`, ...)."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    folder = Path(lm_eval.tasks.__file__).parent / "mmlu" / "default"
    out = []
    for f in sorted(folder.glob("mmlu_*.yaml")):
        cfg = load_yaml(f, resolve_func=False)
        if group is None or cfg.get("tag") == f"{group}_tasks":
            out.append(cfg["dataset_name"])
    return out


def write_stock_copies(root: Path, fewshot: bool = True, mmlu_group: str | None = "mmlu_humanities") -> Path:
    """Local copies of ai2_arc (both configs), hellaswag, piqa, winogrande (winogrande_xl),
    mmlu (anatomy plus every subject of `mmlu_group`) and gsm8k under `root`. Without
    `fewshot`, the splits stock tasks draw few-shot examples from (train; mmlu's dev)
    are left out."""
    def splits(train, evals):
        return ({"train": train} if fewshot else {}) | evals

    write_hub_dataset(root / "allenai" / "ai2_arc", {
        name: splits(arc_rows(3), {"validation": arc_rows(2, 10), "test": arc_rows(4, 20)})
        for name in ("ARC-Easy", "ARC-Challenge")})
    write_hub_dataset(root / "Rowan" / "hellaswag", {
        None: splits(hellaswag_rows(3), {"validation": hellaswag_rows(4, 10),
                                         "test": hellaswag_rows(2, 20)})})
    write_hub_dataset(root / "baber" / "piqa", {
        None: splits(piqa_rows(3), {"validation": piqa_rows(4, 10), "test": piqa_rows(2, 20)})})
    write_hub_dataset(root / "allenai" / "winogrande", {
        "winogrande_xl": splits(winogrande_rows(3), {"validation": winogrande_rows(4, 10),
                                                     "test": winogrande_rows(2, 20)})})
    subjects = sorted({"anatomy", *(mmlu_subjects(mmlu_group) if mmlu_group else [])})
    write_hub_dataset(root / "cais" / "mmlu", {
        s: ({"dev": mmlu_rows(5, s)} if fewshot else {}) | {"validation": mmlu_rows(2, s, 10),
                                                            "test": mmlu_rows(3, s, 20)}
        for s in subjects})
    write_hub_dataset(root / "openai" / "gsm8k", {"main": splits(gsm_rows(7), {"test": gsm_rows(3)})})
    return root
