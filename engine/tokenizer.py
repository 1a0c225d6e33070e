"""Text <-> token ids: the `Tokenizer` interface the engine uses, and `Tokenizer.from_dir`, which
loads the implementation a checkpoint's files call for.

- `tokenizer.json` (Llama-3.x, Qwen2.5, Qwen3, and most checkpoints since 2023): the Hugging Face
  `tokenizers` library (`tokenizer_hf.HFTokenizer`). When a checkpoint ships both files this one
  is used, as transformers does (its fast tokenizer): it is the one that knows the special tokens
  chat templates emit.
- `tokenizer.model` alone (Llama-2-era checkpoints, the bundled esp-tiny): sentencepiece
  (`tokenizer_sp.SentencePieceTokenizer`).

Both read the rest of the checkpoint the same way (`CheckpointFiles`): `tokenizer_config.json`
(special tokens, `add_bos_token`, `chat_template`), `chat_template.jinja`, the EOS ids of
`config.json` and `generation_config.json` (stop tokens, together with the tokenizer's own
`eos_token`), and `generation_config.json`'s sampling defaults (`generation_defaults`).
"""
from __future__ import annotations

import abc
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from esp.engine.chat_template import (ROLES, fallback_chat_prompt, load_chat_template, render_chat_template,
                                      validate_messages)
from esp.engine.generation_defaults import GenerationDefaults

__all__ = ["ROLES", "CheckpointFiles", "Detokenizer", "Tokenizer", "fallback_chat_prompt", "validate_messages"]


class Detokenizer(Protocol):
    """Streams the text of the tokens that follow a prompt.

    Contract: with `S` the concatenation of every `step()` result and a final `flush()`, and `P`
    the prompt ids, `decode(P)[:len(decode(P)) - prompt_carry] + S == decode(P + outputs)`.
    `prompt_carry` counts the trailing characters of `decode(P)` that are not final yet (a
    character split between prompt and output is emitted whole by the output; almost always 0).
    `step` never returns part of a multi-byte character; `flush` settles what is pending.
    """

    prompt_carry: int

    def step(self, new_ids: Iterable[int]) -> str: ...

    def flush(self) -> str: ...


class Tokenizer(abc.ABC):
    """A vocabulary plus what the checkpoint says about BOS, EOS, chat prompts and sampling.

    `bos_token_id` (None when the model has none), `eos_token_ids` (every id that stops
    generation), `add_bos` (whether `encode` puts BOS first by default), `chat_template` (the
    jinja source, or None) and `generation_defaults` are plain attributes.
    """

    encodes_specials_as_text = False  # does `encode("<s>")` spell out "<s>" instead of giving BOS?

    def __init__(self, *, bos_token_id: int | None, eos_token_ids: Iterable[int], add_bos: bool,
                 chat_template: str | None, generation_defaults: GenerationDefaults | None = None) -> None:
        self.bos_token_id = bos_token_id
        self.eos_token_ids: frozenset[int] = frozenset(eos_token_ids)
        self.add_bos = add_bos and bos_token_id is not None
        self.chat_template = chat_template
        self.generation_defaults = generation_defaults or GenerationDefaults()

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """The tokenizer of a Hugging Face style checkpoint directory (see the module docstring).
        Raises `FileNotFoundError` when it has neither `tokenizer.json` nor `tokenizer.model`, and
        `ValueError` naming the file when one of its files is broken."""
        d = Path(model_dir)
        if (d / "tokenizer.json").is_file():
            from esp.engine.tokenizer_hf import HFTokenizer
            return HFTokenizer.from_dir(d)
        if (d / "tokenizer.model").is_file():
            from esp.engine.tokenizer_sp import SentencePieceTokenizer
            return SentencePieceTokenizer.from_dir(d)
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {d}")

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Ids are in [0, vocab_size)."""

    @abc.abstractmethod
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`, with BOS first when `add_bos` (default: what the model expects)."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids` (special tokens are not rendered)."""

    @abc.abstractmethod
    def detokenizer(self, prompt_ids: Sequence[int] = ()) -> Detokenizer:
        """A streaming decoder for the tokens that follow `prompt_ids` (read in O(1), not copied)."""

    @abc.abstractmethod
    def special_tokens(self) -> dict[str, str]:
        """The named special tokens a chat template may use (`bos_token`, `eos_token`, ...)."""

    def apply_chat_template(self, messages: list[dict]) -> str:
        """The prompt text for `messages`, ending where the assistant's reply starts.

        With a chat template (from the checkpoint) and jinja2 installed, the template is rendered
        with `add_generation_prompt=True`, so that `encode` of the result gives one BOS: where
        `encode` reads special-token strings as text (`encodes_specials_as_text`), a BOS string
        the template starts with is dropped when `encode` adds BOS; otherwise that string is BOS
        and `encode` adds no second one. Without a template, `fallback_chat_prompt`. Raises
        `ValueError` for malformed messages or a template that rejects them.
        """
        validate_messages(messages)
        tokens = self.special_tokens()
        text = None
        if self.chat_template is not None:
            text = render_chat_template(self.chat_template, messages, tokens)
        if text is None:
            return fallback_chat_prompt(messages)
        bos = tokens.get("bos_token", "")
        if bos and self.add_bos and self.encodes_specials_as_text and text.startswith(bos):
            text = text[len(bos):]
        return text


@dataclass(frozen=True)
class CheckpointFiles:
    """The JSON files of a checkpoint directory that shape tokenization (empty when absent)."""

    dir: Path
    tokenizer_config: dict
    config: dict
    generation_config: dict

    @classmethod
    def read(cls, model_dir: Path) -> CheckpointFiles:
        return cls(model_dir, *(read_json(model_dir / name) for name in
                                ("tokenizer_config.json", "config.json", "generation_config.json")))

    def eos_ids(self) -> frozenset[int]:
        """`eos_token_id` of `config.json` and of `generation_config.json`, together."""
        return _id_set(self.config.get("eos_token_id")) | _id_set(self.generation_config.get("eos_token_id"))

    def chat_template(self) -> str | None:
        return load_chat_template(self.dir, self.tokenizer_config)

    def generation_defaults(self) -> GenerationDefaults:
        return GenerationDefaults.from_config(self.generation_config, str(self.dir / "generation_config.json"))

    def token_string(self, key: str) -> str | None:
        """`tokenizer_config.json`'s special token `key` (a string or an `AddedToken` object)."""
        value = self.tokenizer_config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) and value else None


def read_json(path: Path) -> dict:
    """The JSON object in `path` ({} when there is no such file); `ValueError` naming the file otherwise."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _id_set(value: object) -> frozenset[int]:
    if isinstance(value, bool):
        return frozenset()
    if isinstance(value, int):
        return frozenset([value])
    if isinstance(value, list):
        return frozenset(v for v in value if isinstance(v, int) and not isinstance(v, bool))
    return frozenset()
