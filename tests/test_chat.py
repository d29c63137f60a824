"""Chat and Thinking models: lm-eval's chat-template interface on OuroLM (--apply_chat_template,
--system_instruction, --fewshot_as_multiturn), the same requests for the trace pass, replay and
lm-eval's own evaluate, the tokenizer's template or an override, and one-line errors."""

import logging

import pytest
from cli_helpers import run_cli
from harness_helpers import WORDS, make_tasks, make_tokenizer

logging.getLogger("lm_eval").setLevel(logging.ERROR)

MARKS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|bot|>", "<|you|>"]
# generation prompts end in a newline, as Ouro-Thinking's "<|im_start|>assistant\n" (the answer,
# appended without a space under chat templates, is then a word of its own)
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
OTHER = ("{% for m in messages %}{% if m['role'] == 'user' %}<|you|>{% else %}<|bot|>{% endif %} "
         "{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<|bot|>\n{% endif %}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A tiny model whose tokenizer ships a chat template, one without, and the tiny tasks."""
    import torch

    from ouro_lab.loading import save_model
    from ouro_lab.model import OuroConfig, OuroForCausalLM, init_weights

    root = tmp_path_factory.mktemp("chat")
    tok = make_tokenizer(WORDS + MARKS)
    tok.chat_template = TEMPLATE
    cfg = OuroConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, total_ut_steps=3, max_position_embeddings=256,
                     bos_token_id=1, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    model = init_weights(OuroForCausalLM(cfg), std=0.3, seed=0)
    save_model(model, root / "chat_model", tokenizer=tok)
    save_model(model, root / "plain_model", tokenizer=make_tokenizer(WORDS + MARKS))
    make_tasks(root / "tasks", n=6)
    (root / "other.jinja").write_text(OTHER)
    return root


def _taskset(lab, **chat):
    from ouro_lab.tasks import TaskSet

    return TaskSet(["tiny_mc", "tiny_gen"], include_path=[lab / "tasks"], limit=3, num_fewshot=1, **chat)


def test_requests_are_chat_formatted_everywhere(lab):
    """The trace pass's requests are lm-eval's chat-formatted ones (system message, shots as
    turns, the answer continuing the assistant turn); lm-eval's own evaluate builds the same,
    and a replay at full depth equals the plain run."""
    import torch

    from ouro_lab.lm import OuroLM
    from ouro_lab.loading import load_model, load_tokenizer
    from ouro_lab.registry import make_strategy
    from ouro_lab.scoring import metric_rows, run_evaluate, score
    from ouro_lab.tracing import trace_pass

    torch.set_num_threads(1)
    model, tok = load_model(lab / "chat_model"), load_tokenizer(lab / "chat_model")
    ts = _taskset(lab, apply_chat_template=True, system_instruction="answer", fewshot_as_multiturn=True)
    ts.use_tokenizer(tok, path=lab / "chat_model")
    trace, units = trace_pass(model, tok, ts, batch_size=4)
    ctx = tok.decode(units[0].ctx)
    assert ctx.startswith("<|system|> answer <|end|> <|user|>") and ctx.count("<|user|>") == 2
    assert ctx.count("<|assistant|>") == 2  # the shot's answer turn, and the turn being scored
    lm = OuroLM(model=model, tokenizer=tok, batch_size=4, max_gen_toks=3)
    res = run_evaluate(lm, ts, ["tiny_mc", "tiny_gen"], bootstrap_iters=0)
    by_doc = {s["doc_id"]: s["arguments"][0][0] for s in res["samples"]["tiny_mc"]}
    scorer_args = {i.doc_id: i.args[0] for i in ts.scorers[("tiny_mc",)].instances["tiny_mc"] if i.idx == 0}
    assert by_doc == scorer_args
    gen = res["samples"]["tiny_gen"][0]["arguments"][0][0]
    assert gen.startswith("<|system|> answer") and gen.rstrip().endswith("<|assistant|>")
    replay = score(ts, trace, make_strategy("fixed", {"step": 3}), bootstrap_iters=0)[0]
    plain = {(r["task"], r["metric"]): r["value"] for r in metric_rows(res)}
    assert all(plain[(r["task"], r["metric"])] == r["value"] for r in replay)


def test_override_template_and_errors(lab):
    from ouro_lab.chat import ChatTemplate
    from ouro_lab.errors import OuroLabError
    from ouro_lab.loading import load_tokenizer

    tok = load_tokenizer(lab / "chat_model")
    msgs = [{"role": "user", "content": "two plus two"}]
    assert ChatTemplate(tok).apply_chat_template(msgs) == "<|user|> two plus two <|end|> <|assistant|>\n"
    for override in (lab / "other.jinja", OTHER):  # a file, or the template text itself
        assert ChatTemplate(tok, override).apply_chat_template(msgs) == "<|you|> two plus two <|bot|>\n"
    with pytest.raises(OuroLabError, match="no such file"):
        ChatTemplate(tok, lab / "nope.jinja")
    ts = _taskset(lab, apply_chat_template=True)
    with pytest.raises(OuroLabError, match="has no chat template; give one with chat_template="):
        ts.use_tokenizer(load_tokenizer(lab / "plain_model"), path=lab / "plain_model")
    with pytest.raises(OuroLabError, match="fewshot_as_multiturn needs apply_chat_template"):
        _taskset(lab, fewshot_as_multiturn=True)


def test_eval_and_recipes_take_the_chat_switches(lab, monkeypatch, capsys, tmp_path):
    r = run_cli(monkeypatch, capsys, "eval", lab / "chat_model", "--tasks", "tiny_mc", "--include-path",
                lab / "tasks", "--limit", "2", "--num-fewshot", "1", "--apply-chat-template",
                "--system-instruction", "answer", "--fewshot-as-multiturn", "--out", tmp_path / "e")
    assert r.returncode == 0, r.stderr
    r = run_cli(monkeypatch, capsys, "eval", lab / "plain_model", "--tasks", "tiny_mc", "--include-path",
                lab / "tasks", "--apply-chat-template")
    assert r.returncode == 2 and "has no chat template" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(monkeypatch, capsys, "eval", lab / "plain_model", "--tasks", "tiny_mc", "--include-path",
                lab / "tasks", "--limit", "2", "--apply-chat-template",
                "--chat-template", lab / "other.jinja")
    assert r.returncode == 0, r.stderr
    recipe = tmp_path / "r.yaml"
    body = ("model: {{path: {m}, threads: 1{chat}}}\n"
            "tasks: {{names: [tiny_mc], include: [{t}], limit: 2, num_fewshot: 1, "
            "apply_chat_template: true, system_instruction: answer, fewshot_as_multiturn: true}}\n"
            "strategies: [{{name: threshold, grid: {{q: 0.5}}}}]\n")
    recipe.write_text(body.format(m=lab / "plain_model", t=lab / "tasks",
                                  chat=", chat_template: other.jinja"))
    (tmp_path / "other.jinja").write_text(OTHER)  # relative to the recipe
    r = run_cli(monkeypatch, capsys, "validate", recipe)
    assert r.returncode == 0, r.stderr
    recipe.write_text(body.format(m=lab / "plain_model", t=lab / "tasks", chat=""))
    r = run_cli(monkeypatch, capsys, "validate", recipe)
    assert r.returncode == 2 and "tasks.apply_chat_template" in r.stderr and "no chat template" in r.stderr
