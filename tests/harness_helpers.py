"""Tiny random Ouro model, word-level tokenizer and lm-eval tasks written into a tmp folder,
shared by test_harness.py, test_live.py and test_tasks.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
         "plus", "minus", "is", "what", "answer", "question", ":", ".", "?", "yes", "no",
         "red", "blue", "green", "cat", "dog", "the", "a", "and"]
SPECIAL = ["<pad>", "<eos>", "<unk>"]


def make_tokenizer(words: list[str] | None = None, size: int | None = None, special=None):
    """A word-level tokenizer: `special` (pad, eos, unk tokens; default SPECIAL) then `words`
    (default WORDS), padded with `<extra_i>` tokens to `size` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = special or SPECIAL
    vocab = {w: i for i, w in enumerate(dict.fromkeys(special + (WORDS if words is None else words)))}
    vocab.update({f"<extra_{i}>": i for i in range(len(vocab), size or 0)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=special[-1]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=special[0], eos_token=special[1],
                                   unk_token=special[-1])


def make_model_dir(path: Path, seed: int = 0, steps: int = 4, std: float = 0.3) -> Path:
    """A random 2-layer Ouro with a large init (so the steps disagree) and its tokenizer."""
    import torch

    from ouro_lab.loading import save_model
    from ouro_lab.model import OuroConfig, OuroForCausalLM, init_weights

    cfg = OuroConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     total_ut_steps=steps, max_position_embeddings=64, bos_token_id=1,
                     eos_token_id=1, pad_token_id=0)
    torch.manual_seed(seed)
    model = init_weights(OuroForCausalLM(cfg), std=std, seed=seed)
    with torch.no_grad():  # spread the gate so exit decisions vary across tokens
        model.model.early_exit_gate.bias.fill_(-0.5)
    return save_model(model, path, tokenizer=make_tokenizer())


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_tasks(root: Path, n: int = 12, seed: int = 0) -> Path:
    """tiny_mc (multiple_choice, acc + acc_norm, docs with `difficulty`), tiny_gen
    (generate_until, exact_match) and tiny_ppl (loglikelihood_rolling), each a YAML with
    its JSONL named relative to the YAML's folder."""
    rng = random.Random(seed)
    nums = WORDS[:10]
    mc, gen, ppl = [], [], []
    for i in range(n):
        a, b = rng.randrange(5), rng.randrange(5)
        mc.append({"question": f"what is {nums[a]} plus {nums[b]} ?",
                   "choices": [nums[a + b], nums[(a + b + 1) % 10], nums[(a + b + 3) % 10]],
                   "label": 0, "difficulty": 1 + i % 3})
        gen.append({"question": f"question : {nums[a]} plus {nums[b]} answer :",
                    "answer": nums[a + b], "difficulty": 1 + i % 2})
        ppl.append({"text": " ".join(rng.choice(WORDS[10:]) for _ in range(6 + i % 5))})
    (root / "tiny_mc").mkdir(parents=True, exist_ok=True)
    (root / "tiny_gen").mkdir(exist_ok=True)
    (root / "tiny_ppl").mkdir(exist_ok=True)
    _write_jsonl(root / "tiny_mc" / "test.jsonl", mc)
    _write_jsonl(root / "tiny_gen" / "test.jsonl", gen)
    _write_jsonl(root / "tiny_ppl" / "test.jsonl", ppl)
    (root / "tiny_mc" / "tiny_mc.yaml").write_text(
        "task: tiny_mc\noutput_type: multiple_choice\ndataset_path: json\n"
        "dataset_kwargs:\n  data_files: {test: test.jsonl}\ntest_split: test\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n")
    (root / "tiny_gen" / "tiny_gen.yaml").write_text(
        "task: tiny_gen\noutput_type: generate_until\ndataset_path: json\n"
        "dataset_kwargs:\n  data_files: {test: test.jsonl}\ntest_split: test\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\ntarget_delimiter: " "\n'
        "generation_kwargs:\n  until: [\".\", \"?\"]\n  max_gen_toks: 4\n  do_sample: false\n"
        "filter_list:\n  - name: first\n    filter:\n"
        "      - {function: regex, regex_pattern: \"^ *(\\\\w+)\"}\n"
        "      - {function: take_first}\n"
        "metric_list:\n  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n")
    (root / "tiny_ppl" / "tiny_ppl.yaml").write_text(
        "task: tiny_ppl\noutput_type: loglikelihood_rolling\ndataset_path: json\n"
        "dataset_kwargs:\n  data_files: {test: test.jsonl}\ntest_split: test\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - {metric: word_perplexity}\n  - {metric: byte_perplexity}\n"
        "  - {metric: bits_per_byte}\n")
    return root
