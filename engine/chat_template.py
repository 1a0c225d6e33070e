"""Chat prompts: message validation, the checkpoint's jinja chat template, and the fallback format.

Templates render the way transformers renders them (`apply_chat_template`): a sandboxed jinja2
environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension and the
`{% generation %}` tag, a `tojson` filter that does not escape HTML, and the globals
`raise_exception` and `strftime_now`; the tokenizer's named special tokens (`bos_token`,
`eos_token`, ...) are template variables.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path

__all__ = ["ROLES", "fallback_chat_prompt", "load_chat_template", "render_chat_template", "validate_messages"]

ROLES = ("system", "user", "assistant")


def validate_messages(messages: object) -> None:
    """Raise `ValueError` unless `messages` is a non-empty list of
    `{"role": "system"|"user"|"assistant", "content": str}` dicts (other keys are allowed)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{k}] must be an object with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ValueError(f"messages[{k}].role must be one of {', '.join(map(repr, ROLES))}, got {role!r}")
        if not isinstance(m.get("content"), str):
            got = type(m["content"]).__name__ if "content" in m else "nothing"
            raise ValueError(f"messages[{k}].content must be a string, got {got}")


def fallback_chat_prompt(messages: list[dict]) -> str:
    """The chat format for checkpoints without a template: one `"<role>: <content>\\n"` line per
    message, then `"assistant:"` (the reply continues that line)."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def load_chat_template(model_dir: Path, tokenizer_config: Mapping) -> str | None:
    """The checkpoint's template source: `chat_template.jinja` if present, else `tokenizer_config.json`'s
    `chat_template` (a string, or a list of `{"name", "template"}` of which "default" is used).
    Raises `ValueError` naming the file when the template does not compile."""
    path = model_dir / "chat_template.jinja"
    if path.is_file():
        source: str | None = path.read_text(encoding="utf-8")
    else:
        path = model_dir / "tokenizer_config.json"
        source = _pick_template(tokenizer_config.get("chat_template"))
    if source:
        try:
            _compile(source)
        except Exception as err:  # jinja2's TemplateSyntaxError: say which file holds the template
            raise ValueError(f"{path}: the chat template does not compile: {err}") from None
    return source or None


def _pick_template(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        chosen = named.get("default")
        return chosen if isinstance(chosen, str) else None
    return None


def render_chat_template(source: str, messages: list[dict], special_tokens: Mapping[str, str]) -> str | None:
    """`source` rendered for `messages` with `add_generation_prompt=True`, or None when jinja2 is
    not installed. Raises `ValueError` when the template refuses the messages."""
    template = _compile(source)
    if template is None:
        return None
    try:
        return template.render(messages=messages, add_generation_prompt=True, **special_tokens)
    except ValueError:
        raise
    except Exception as err:  # jinja2 errors: the template refused these messages
        raise ValueError(f"chat template failed: {err}") from None


@lru_cache(maxsize=8)
def _compile(source: str):
    try:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _generation_tag()])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _generation_tag():
    """`{% generation %}...{% endgeneration %}` renders its body: transformers marks the assistant's
    tokens with it (for training masks), which serving has no use for."""
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return GenerationTag


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template: {message}")
