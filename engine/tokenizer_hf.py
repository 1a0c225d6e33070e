"""The Hugging Face `tokenizers` tokenizer (`tokenizer.json` checkpoints) and its streaming detokenizer.

Encoding is what transformers' tokenizer gives (`AutoTokenizer.from_pretrained(dir)(text)`):
added tokens in the text, special or not, are matched first (so a rendered chat prompt's
`<|im_start|>` is one token), then `tokenizer.json`'s post-processor adds what the model
expects (Llama-3's `TemplateProcessing` adds `<|begin_of_text|>`; Qwen's adds nothing). As in
transformers 5, `add_bos_token` / `add_eos_token` in `tokenizer_config.json` do not override the
post-processor (a contradicting one is logged). One deliberate difference: text that already
starts with the BOS string does not get a second BOS. A rendered chat prompt keeps the BOS
string its template starts with, so it encodes as transformers' `apply_chat_template` encodes it
(which matters where the pre-tokenizer treats the text's first word apart, as Metaspace does).

Decoding skips special tokens and does not apply `clean_up_tokenization_spaces` (transformers
skips it for BPE models too).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as _Backend

from esp.engine.generation_defaults import GenerationDefaults
from esp.engine.tokenizer import CheckpointFiles, Tokenizer

__all__ = ["HFTokenizer", "StreamDecoder"]

log = logging.getLogger("esp.tokenizer")

_REPLACEMENT = "\ufffd"
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` plus what the checkpoint says about BOS/EOS and chat prompts."""

    def __init__(self, backend: _Backend, *, special_tokens: dict[str, str], add_bos: bool,
                 eos_token_ids: Iterable[int], chat_template: str | None = None,
                 generation_defaults: GenerationDefaults | None = None) -> None:
        self.backend = backend
        self._special = dict(special_tokens)
        bos = self._special.get("bos_token")
        super().__init__(bos_token_id=backend.token_to_id(bos) if bos else None, eos_token_ids=eos_token_ids,
                         add_bos=add_bos, chat_template=chat_template, generation_defaults=generation_defaults)
        self._vocab = backend.get_vocab_size(with_added_tokens=True)
        self._byte_tokens = _byte_fallback_ids(backend)
        self._special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        self.encodes_specials_as_text = backend.encode_special_tokens  # `split_special_tokens: true`

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> HFTokenizer:
        """Load `tokenizer.json`; `tokenizer_config.json` (named special tokens,
        `split_special_tokens`, `chat_template`), `chat_template.jinja`, and
        `config.json` / `generation_config.json` (EOS ids, sampling defaults) when present. The
        stop tokens are the EOS ids of all three files."""
        d = Path(model_dir)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {d}")
        try:
            backend = _Backend.from_file(str(path))
        except Exception as err:  # the tokenizers library raises plain Exceptions for malformed files
            raise ValueError(f"{path}: the tokenizers library cannot load it ({err})") from None
        files = CheckpointFiles.read(d)
        special = {key: tok for key in _NAMED_TOKENS if (tok := files.token_string(key)) is not None}
        for key in ("bos_token", "eos_token"):
            if key in special and backend.token_to_id(special[key]) is None:
                raise ValueError(f"{d / 'tokenizer_config.json'}: {key} {special[key]!r} is not a token of {path}")
        cfg = files.tokenizer_config
        backend.encode_special_tokens = bool(cfg.get("split_special_tokens", False))
        backend.no_truncation()  # as transformers' tokenizer(text) by default: all of a long prompt,
        backend.no_padding()     # whatever truncation or padding tokenizer.json was saved with
        add_bos = _adds_bos(backend, special.get("bos_token"))
        if "add_bos_token" in cfg and bool(cfg["add_bos_token"]) != add_bos and special.get("bos_token"):
            log.warning("%s: add_bos_token is %s, but the post-processor of %s %s BOS; following %s, as "
                        "transformers does", d / "tokenizer_config.json", cfg["add_bos_token"], path,
                        "adds" if add_bos else "does not add", path.name)
        eos = set(files.eos_ids())
        if "eos_token" in special:
            eos.add(backend.token_to_id(special["eos_token"]))
        return cls(backend, special_tokens=special, add_bos=add_bos,
                   eos_token_ids=eos, chat_template=files.chat_template(),
                   generation_defaults=files.generation_defaults())

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text` as transformers encodes it. `add_bos=False` adds no special tokens
        at all; `add_bos=True` puts BOS first even where the post-processor would not."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        bos = self.bos_token_id
        if add_bos is None or (add_bos and self.add_bos):
            ids = self.backend.encode(text, add_special_tokens=True).ids
            added = self.add_bos
        else:
            ids = self.backend.encode(text, add_special_tokens=False).ids
            added = bool(add_bos) and bos is not None
            if added:
                ids.insert(0, bos)
        if added and ids[:2] == [bos, bos] and text.startswith(self._special["bos_token"]):
            del ids[0]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, special tokens skipped. Ids past `vocab_size` render as nothing (a
        model's embedding may be padded past its tokenizer, as Qwen2.5's is); negative ids raise."""
        return self.backend.decode(_checked(ids), skip_special_tokens=True)

    def detokenizer(self, prompt_ids: Sequence[int] = ()) -> StreamDecoder:
        return StreamDecoder(self, prompt_ids)

    def special_tokens(self) -> dict[str, str]:
        return dict(self._special)


class StreamDecoder:
    """Streams text like `tokenizers.decoders.DecodeStream`, plus `flush` and a prompt to follow.

    It keeps a short window of ids and the part of their text already emitted (`_prefix`); a new
    token's text is what decoding the window with it appends. Special tokens (and ids past the
    vocabulary) render nothing and are left out of the window. Text is held while it is not
    final: while it ends in U+FFFD (a character whose bytes are not all here yet), and, with a
    `ByteFallback` decoder (sentencepiece-converted `tokenizer.json`: Llama-2, Mistral), while a
    run of byte tokens (`<0xE4>`) is open, since one invalid byte turns every byte of its run
    into U+FFFD. After each emission the window restarts at the previous emission's tokens, so
    a step decodes a few ids. Past `MAX_HELD` held tokens, what is final for a byte-level
    decoder (all but the last `_INCOMPLETE` U+FFFDs) is emitted, which bounds the window; only a
    byte-fallback run of more valid bytes than that, then an invalid one, streams other text
    than `decode` gives. See `tokenizer.Detokenizer` for the contract; `prompt_carry` counts
    characters here.
    """

    PROMPT_CONTEXT = 4
    MAX_HELD = 256
    _INCOMPLETE = 3  # U+FFFDs an unfinished UTF-8 character can decode to (byte fallback: one per byte)

    def __init__(self, tokenizer: HFTokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self._backend = tokenizer.backend
        self._bytes, self._specials, self._vocab = tokenizer._byte_tokens, tokenizer._special_ids, tokenizer.vocab_size
        self._ids = self._prompt_tail(prompt_ids)
        text, run = self._decode(self._ids), self._open_run()
        self._run_open = run < len(self._ids)
        settled = self._decode(self._ids[:run]) if self._run_open else text
        keep = len(settled) - min(self._INCOMPLETE, len(settled) - len(settled.rstrip(_REPLACEMENT)))
        self.prompt_carry = len(text) - keep
        self._prefix = text[:keep]
        self._start = len(self._ids)  # where the window restarts after the next emission

    def _prompt_tail(self, prompt_ids: Sequence[int]) -> list[int]:
        """The prompt's last tokens that render text: at least `PROMPT_CONTEXT`, starting at a
        character's first token (not inside one) and before any byte-fallback run still open."""
        tail: list[int] = []  # newest first
        in_run = True         # every token read so far is a byte token
        n = len(prompt_ids)
        for j in range(n - 1, max(-1, n - 1 - self.MAX_HELD - 4 * self.PROMPT_CONTEXT), -1):
            i = _checked([prompt_ids[j]])[0]
            if self._silent(i):
                continue
            tail.append(i)
            in_run = in_run and i in self._bytes
            if not in_run and len(tail) >= self.PROMPT_CONTEXT:
                text = self._decode(tail[::-1])
                if text and text[0] != _REPLACEMENT:
                    break
        return tail[::-1]

    def step(self, new_ids: Iterable[int]) -> str:
        """The text that `new_ids` complete."""
        out: list[str] = []
        for i in _checked(new_ids):
            if self._silent(i):
                continue
            self._ids.append(i)
            self._run_open = i in self._bytes
            text = self._decode(self._ids)
            if not text.endswith(_REPLACEMENT) and not self._run_open:
                out.append(self._emit(text, len(self._ids)))
            elif len(self._ids) - self._start > self.MAX_HELD:
                out.append(self._emit_final_part(text))
        return "".join(out)

    def flush(self) -> str:
        """Settle held text as if the sequence ended here."""
        self._run_open = False
        return self._emit(self._decode(self._ids), len(self._ids))

    def _emit(self, text: str, cut: int) -> str:
        """Emit `text` (the text of `_ids[:cut]`) past `_prefix`; restart the window."""
        new = text[len(self._prefix):] if text.startswith(self._prefix) else text[_common_prefix(text, self._prefix):]
        self._ids = self._ids[self._start:]
        self._start = cut - self._start
        self._prefix = self._decode(self._ids[:self._start])
        return new

    def _emit_final_part(self, text: str) -> str:
        """Emit up to the longest prefix of held tokens whose text is final: a prefix of `text`
        that ends before its last `_INCOMPLETE` U+FFFDs; in an open byte-fallback run, the run's
        valid characters so far (the window then restarts inside the run)."""
        if self._run_open:
            for cut in range(len(self._ids) - 1, self._start, -1):
                head = self._decode(self._ids[:cut])
                if not head.endswith(_REPLACEMENT) and head.startswith(self._prefix):
                    new = head[len(self._prefix):]
                    self._ids, self._start, self._prefix = self._ids[cut:], 0, ""
                    return new
            return self._emit(text, len(self._ids))  # an invalid byte already: the run's U+FFFDs are final
        limit = len(text) - min(self._INCOMPLETE, len(text) - len(text.rstrip(_REPLACEMENT)))
        for cut in range(len(self._ids) - 1, self._start, -1):
            head = self._decode(self._ids[:cut])
            if len(self._prefix) <= len(head) <= limit and text.startswith(head):
                return self._emit(head, cut)
        return self._emit(text, len(self._ids))

    def _silent(self, i: int) -> bool:
        return i in self._specials or i >= self._vocab

    def _open_run(self) -> int:
        """Where the byte-fallback run at the end of the window starts (its length: none open)."""
        start = len(self._ids)
        while start > 0 and self._ids[start - 1] in self._bytes:
            start -= 1
        return start

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=True)


def _checked(ids: Iterable[int]) -> list[int]:
    out = [int(i) for i in ids]
    bad = next((i for i in out if not 0 <= i < 2**32), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is out of range [0, 2**32)")
    return out


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _byte_fallback_ids(backend: _Backend) -> frozenset[int]:
    """The ids of the byte tokens (`<0x00>` .. `<0xFF>`) of a `ByteFallback` decoder; none for a
    byte-level one, whose streaming needs no such care."""
    if "ByteFallback()" not in repr(backend.decoder):
        return frozenset()
    vocab = backend.get_vocab(with_added_tokens=True)
    return frozenset(vocab[f"<0x{b:02X}>"] for b in range(256) if f"<0x{b:02X}>" in vocab)


def _adds_bos(backend: _Backend, bos: str | None) -> bool:
    """Whether the post-processor puts BOS first."""
    if bos is None:
        return False
    probe = backend.encode("x", add_special_tokens=True)
    return probe.ids[:1] == [backend.token_to_id(bos)] and probe.special_tokens_mask[:1] == [1]
