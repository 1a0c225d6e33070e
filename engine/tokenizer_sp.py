"""The sentencepiece tokenizer (`tokenizer.model` checkpoints) and its streaming detokenizer.

`SentencePieceTokenizer.decode` is sentencepiece's own decoder. `IncrementalDetokenizer`
reproduces its rules token by token in O(1) per token, so streamed text concatenates to exactly
what `decode` gives:

- control pieces (`<s>`, `</s>`) render as nothing; the unknown piece renders as its surface;
- a normal piece renders with `▁` turned into a space, except that the first piece of the
  sequence after only control pieces loses one leading `▁` (the dummy prefix);
- a run of byte pieces (`<0xE2>`) is decoded as UTF-8 one character at a time, and every byte
  that does not start a valid character becomes one U+FFFD. A run ends at any non-byte piece.
"""
from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from esp.engine.generation_defaults import GenerationDefaults
from esp.engine.tokenizer import CheckpointFiles, Tokenizer

__all__ = ["IncrementalDetokenizer", "SentencePieceTokenizer"]

_SPACE = "\u2581"
_REPLACEMENT = "\ufffd"


class _Kind(enum.IntEnum):
    NORMAL = 0
    CONTROL = 1
    UNKNOWN = 2
    BYTE = 3


class _Strip(enum.Enum):
    """How sentencepiece treats a leading `▁` at the start of the decoded text."""

    NEVER = "never"        # add_dummy_prefix and remove_extra_whitespaces both off
    ONCE = "once"          # add_dummy_prefix: only the first non-control piece loses its `▁`
    UNTIL_TEXT = "until"   # remove_extra_whitespaces: every piece does, until text is non-empty


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model plus what the checkpoint says about BOS/EOS and chat prompts.

    `encode` never parses special-token strings: `"<s>"` in text is encoded as text. As in every
    sentencepiece model, a literal `▁` (U+2581) in text decodes as a space.
    """

    encodes_specials_as_text = True

    def __init__(self, sp: spm.SentencePieceProcessor, *, add_bos: bool = True,
                 bos_token_id: int | None = None, eos_token_ids: Iterable[int] | None = None,
                 chat_template: str | None = None, generation_defaults: GenerationDefaults | None = None) -> None:
        self.sp = sp
        n = sp.get_piece_size()
        bos = sp.bos_id() if bos_token_id is None else bos_token_id
        eos = [sp.eos_id()] if eos_token_ids is None else list(eos_token_ids)
        super().__init__(bos_token_id=bos if 0 <= bos < n else None,
                         eos_token_ids=(e for e in eos if 0 <= e < n), add_bos=add_bos,
                         chat_template=chat_template, generation_defaults=generation_defaults)
        self._kind = [_Kind.NORMAL] * n
        self._surface = [""] * n
        self._byte = [0] * n
        self._leading_space = [False] * n
        for i in range(n):
            piece = sp.id_to_piece(i)
            if sp.is_control(i):
                self._kind[i] = _Kind.CONTROL
            elif sp.is_unknown(i):
                self._kind[i] = _Kind.UNKNOWN
                self._surface[i] = sp.decode([i])
            elif sp.is_byte(i):
                self._kind[i] = _Kind.BYTE
                self._byte[i] = int(piece[3:5], 16)
            else:
                self._surface[i] = piece.replace(_SPACE, " ")
                self._leading_space[i] = piece.startswith(_SPACE)
        self._strip = self._probe_strip()

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> SentencePieceTokenizer:
        """Load `tokenizer.model`; `tokenizer_config.json` (`add_bos_token`, default true;
        `eos_token`; `chat_template`), `chat_template.jinja`, the BOS/EOS ids of `config.json` and
        `generation_config.json` and the latter's sampling defaults are read when present. EOS ids
        of all three are stop tokens; without any, sentencepiece's own EOS is."""
        d = Path(model_dir)
        path = d / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.model in {d}")
        try:
            sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"{path}: not a sentencepiece model ({err})") from None
        files = CheckpointFiles.read(d)
        bos = files.config.get("bos_token_id", files.generation_config.get("bos_token_id"))
        eos = set(files.eos_ids())
        eos_piece = files.token_string("eos_token")
        if eos_piece is not None and sp.piece_to_id(eos_piece) != sp.unk_id():
            eos.add(sp.piece_to_id(eos_piece))
        return cls(sp, add_bos=bool(files.tokenizer_config.get("add_bos_token", True)),
                   bos_token_id=bos if isinstance(bos, int) and not isinstance(bos, bool) else None,
                   eos_token_ids=eos or None, chat_template=files.chat_template(),
                   generation_defaults=files.generation_defaults())

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`, with BOS first when `add_bos` (default: what the model expects)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self.sp.encode(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids` (special tokens are not rendered); `ValueError` for ids out of range."""
        return self.sp.decode(self._checked(ids))

    def detokenizer(self, prompt_ids: Sequence[int] = ()) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids)

    def special_tokens(self) -> dict[str, str]:
        sp = self.sp
        bos = sp.id_to_piece(self.bos_token_id) if self.bos_token_id is not None else ""
        eos_id = sp.eos_id() if sp.eos_id() in self.eos_token_ids else min(self.eos_token_ids, default=None)
        eos = sp.id_to_piece(eos_id) if eos_id is not None else ""
        unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else ""
        return {"bos_token": bos, "eos_token": eos, "unk_token": unk}

    # -- internals ------------------------------------------------------------------------
    def _checked(self, ids: Iterable[int]) -> list[int]:
        out = [int(i) for i in ids]
        n = self.vocab_size
        bad = next((i for i in out if not 0 <= i < n), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is out of range [0, {n})")
        return out

    def _probe_strip(self) -> _Strip:
        """Find out from sentencepiece itself how it strips the leading `▁` of decoded text."""
        word = next((i for i in range(self.vocab_size) if self._kind[i] == _Kind.NORMAL
                     and self.sp.id_to_piece(i).startswith(_SPACE) and len(self.sp.id_to_piece(i)) > 1
                     and _SPACE not in self.sp.id_to_piece(i)[1:]), None)
        if word is None or self.sp.decode([word]) == self._surface[word]:
            return _Strip.NEVER
        space = self.sp.piece_to_id(_SPACE)
        if self._kind[space] == _Kind.NORMAL and self.sp.id_to_piece(space) == _SPACE:
            if self.sp.decode([space, word]) == self._surface[word][1:]:
                return _Strip.UNTIL_TEXT
        return _Strip.ONCE


class IncrementalDetokenizer:
    """Streams the text of the tokens that follow a prompt.

    Contract (checked by the tests against `Tokenizer.decode`): with `S` the concatenation of
    every `step()` result and a final `flush()`, and `P` the prompt ids,
    `decode(P)[:len(decode(P)) - prompt_carry] + S == decode(P + outputs)`. `prompt_carry` is the
    number of trailing prompt bytes that do not yet form a whole character (almost always 0); they
    are carried into the output, so a character split between prompt and output is emitted whole.
    `step` never returns part of a multi-byte character; `flush` settles what is pending (bytes
    that never completed a character become U+FFFD, one per byte, as in `decode`).
    Cost: O(len(new_ids)) per `step`; construction reads only the prompt's leading control
    tokens and its last three tokens.
    """

    def __init__(self, tokenizer: SentencePieceTokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        self._fresh = True
        self._pending = bytearray()
        kinds, values, vocab = tokenizer._kind, tokenizer._byte, tokenizer.vocab_size

        def read(j: int) -> int:
            i = int(prompt_ids[j])
            if not 0 <= i < vocab:
                raise ValueError(f"token id {i} is out of range [0, {vocab})")
            return i

        end = len(prompt_ids)
        j = 0
        while self._fresh and j < end:
            i = read(j)
            if kinds[i] == _Kind.BYTE:
                self._fresh = False
            else:
                self._render(i)
            j += 1
        start = end
        while start > 0 and end - start < 3 and kinds[read(start - 1)] == _Kind.BYTE:
            start -= 1
        lead = next((j for j in range(end - 1, start - 1, -1) if not _is_trail(values[read(j)])), None)
        if lead is not None:
            self._pending.extend(values[read(j)] for j in range(lead, end))
            self._settle(final=False)
        self.prompt_carry = len(self._pending)

    def step(self, new_ids: Iterable[int]) -> str:
        """The text that `new_ids` complete."""
        tok = self._tok
        out: list[str] = []
        for i in tok._checked(new_ids):
            if tok._kind[i] == _Kind.BYTE:
                self._fresh = False
                self._pending.append(tok._byte[i])
                out.append(self._settle(final=False))
            else:
                if self._pending:
                    out.append(self._settle(final=True))
                out.append(self._render(i))
        return "".join(out)

    def flush(self) -> str:
        """Settle pending bytes as if the sequence ended here."""
        return self._settle(final=True)

    def _render(self, i: int) -> str:
        """The text of non-byte piece `i` at this point of the sequence; updates `_fresh`."""
        tok = self._tok
        kind = tok._kind[i]
        if kind == _Kind.CONTROL:
            return ""
        text = tok._surface[i]
        if self._fresh:
            if kind == _Kind.NORMAL and tok._strip != _Strip.NEVER and tok._leading_space[i]:
                text = text[1:]
            self._fresh = tok._strip == _Strip.UNTIL_TEXT and not text
        return text

    def _settle(self, final: bool) -> str:
        """Decode whole characters off the front of the pending bytes; with `final`, all of them."""
        buf = self._pending
        out: list[str] = []
        o, n = 0, len(buf)
        while o < n:
            need = _char_len(buf[o])
            if n - o < need:
                if not final and all(_is_trail(b) for b in buf[o + 1:]):
                    break
                out.append(_REPLACEMENT)
                o += 1
                continue
            try:
                out.append(bytes(buf[o:o + need]).decode("utf-8"))
                o += need
            except UnicodeDecodeError:
                out.append(_REPLACEMENT)
                o += 1
        del buf[:o]
        return "".join(out)


def _char_len(lead: int) -> int:
    """Bytes a UTF-8 character starting with `lead` would take (1 for bytes that start none)."""
    if 0xC0 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF7:
        return 4
    return 1


def _is_trail(b: int) -> bool:
    return 0x80 <= b <= 0xBF
