"""Chat templates: lm-eval's chat-template interface for a tokenizer, with an override.

    chat = ChatTemplate(tokenizer, override="template.jinja")   # or a template string, or None
    chat.apply_chat_template([{"role": "user", "content": "2+2?"}])  # the prompt, as a string

`OuroLM` exposes it to lm-eval (`--apply_chat_template`, `--system_instruction`,
`--fewshot_as_multiturn`), and `TaskSet` builds chat-formatted requests with it once for the
trace pass and every replayed setting. The template is the override when given (a Jinja
file or the template text itself), else the tokenizer's own (`chat_template` in
tokenizer_config.json: the Ouro Thinking checkpoints ship one); a named template of a
tokenizer holding several is picked with `apply_chat_template: <name>`.
"""

from __future__ import annotations

from pathlib import Path

from ouro_lab.errors import OuroLabError


class ChatTemplateError(OuroLabError):
    """A chat template asked for that cannot be found or rendered."""


def read_template(override: str | Path | None) -> str | None:
    """The template text of an override: a file's content, or the string itself when it holds
    Jinja markup; None stays None."""
    if override is None:
        return None
    text = str(override)
    if "{{" in text or "{%" in text:
        return text
    path = Path(text).expanduser()
    if not path.is_file():
        raise ChatTemplateError(f"chat_template {text}: no such file; give a Jinja template file or the "
                                "template text itself")
    return path.read_text()


class ChatTemplate:
    """lm-eval's chat interface (`apply_chat_template`, `chat_template`, `tokenizer_name`) for
    `tokenizer`, rendering with `override` (see `read_template`) when given."""

    def __init__(self, tokenizer, override: str | Path | None = None, source: str = "the tokenizer"):
        self.tokenizer, self.template, self.source = tokenizer, read_template(override), source
        self.name: str | None = None  # one of the tokenizer's named templates

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template lm-eval renders with (None: no chat template asked for); a string
        picks one of several named templates the tokenizer holds."""
        if chat_template is False or chat_template is None:
            return None
        if self.template is not None:
            return self.template
        own = getattr(self.tokenizer, "chat_template", None)
        if isinstance(own, dict):
            name = chat_template if isinstance(chat_template, str) else "default"
            if name not in own:
                raise ChatTemplateError(f"{self.source}: no chat template named {name!r} (it has "
                                        f"{', '.join(sorted(own))}); pick one: apply_chat_template: <name>")
            self.name = name
            return own[name]
        if not own:
            raise ChatTemplateError(f"{self.source} has no chat template; give one with chat_template=<file> "
                                    "(recipes: model.chat_template) or drop apply_chat_template")
        return own

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "ouro")).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The prompt for `chat_history` ([{"role", "content"}, ...]); with
        `add_generation_prompt` False the last (assistant) message is continued, as lm-eval
        asks for loglikelihood targets. A template that rejects the system role gets the
        history without it (lm-eval's HFLM does the same)."""
        import jinja2

        template = self.chat_template(self.name or True)
        kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt,
                      continue_final_message=not add_generation_prompt, chat_template=template)
        try:
            return self.tokenizer.apply_chat_template(chat_history, **kwargs)
        except jinja2.exceptions.TemplateError:
            history = [m for m in chat_history if m["role"] != "system"]
            try:
                return self.tokenizer.apply_chat_template(history, **kwargs)
            except jinja2.exceptions.TemplateError as e:
                raise ChatTemplateError(f"chat template of {self.source} cannot render the requests "
                                        f"({e})") from None


__all__ = ["ChatTemplate", "ChatTemplateError", "read_template"]
