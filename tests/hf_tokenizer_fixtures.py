"""Small byte-level BPE tokenizers in the shape of real Hugging Face checkpoints (import as
`from hf_tokenizer_fixtures import ...`).

`write_tokenizer(out, "llama3")` trains a tiny byte-level BPE on `CORPUS` (deterministic, a
fraction of a second), adds the family's special tokens after the learned vocabulary (as Llama-3
and Qwen2.5 do), and writes `tokenizer.json` and `tokenizer_config.json` (with the chat template)
the way those checkpoints ship them. `"llama2"` is the sentencepiece-converted kind (Llama-2,
Mistral): Metaspace and byte-fallback tokens, specials first. Nothing here reads our own tokenizer: transformers'
`AutoTokenizer.from_pretrained(out)` is the oracle the tests compare against. `checkpoint_ids`
gives the ids a `config.json` / `generation_config.json` needs (`vocab_size`, `bos_token_id`,
`eos_token_id`), so an end-to-end test can put a random-weight model of the family beside it.
`stream` feeds ids to any of our detokenizers the way the engine does.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Multi-byte text is frequent enough that some CJK and accented characters become whole tokens,
# and rare enough that emoji and the rest stay split into byte tokens.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Return the number of items in the container.",
    "def encode(self, text: str) -> list[int]:\n    return self.tokenizer.encode(text).ids\n",
    "Long-context serving splits a prompt over many instances; decoding shrinks back to few.",
    "Café naïve résumé façade; Ærøskøbing and Zürich are places. Éclair, crème brûlée.",
    "中文分词测试，日本語のテキスト、한국어 문장. 你好，世界！今天天气很好。",
    "emoji 🙂 and 👍 are common; 🇫🇷 is a flag; numbers 1234567890 and 3.14159 too.",
    "  two leading spaces,\ttabs\tand\nnew\n\nlines  ",
    "<p>Markup & symbols: {json: [1, 2, 3]}, 50% off, a+b=c, x*y, ~/path/to/file.txt</p>",
] * 4 + ["你好 世界 中文 你好 世界", "the the the and and of of to to in in"] * 8


@dataclass(frozen=True)
class Family:
    """How one model family's tokenizer is built and configured."""

    name: str
    specials: tuple[str, ...]            # appended after the learned vocabulary, in this order
    split: str                           # the pre-tokenizer's regex
    tokenizer_config: dict               # as shipped, without `added_tokens_decoder` and `chat_template`
    chat_template: str
    bos: str | None = None               # TemplateProcessing adds it (Llama-3); None: no post-processor BOS
    nfc: bool = False                    # Qwen2 normalizes to NFC
    byte_fallback: bool = False          # sentencepiece-style (Llama-2, Mistral): Metaspace, <0xE4> byte tokens
    config_eos: tuple[str, ...] = ()     # config.json's eos_token_id
    generation: dict = field(default_factory=dict)  # generation_config.json, eos as token strings


LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

QWEN2_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n' }}{%- for tool in tools %}{{- tool | tojson }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) or message.role == 'assistant' %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")

QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}\n"
    "{%- set ns = namespace(last_query=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n"
    "    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- if message.role == 'user' and ns.last_query == messages|length - 1 %}{%- set ns.last_query = index %}"
    "{%- break %}{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- for message in messages %}\n"
    "    {%- set content = message.content if message.content is string else '' %}\n"
    "    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == 'assistant' %}\n"
    "        {%- set reasoning = '' %}\n"
    "        {%- if '</think>' in content %}\n"
    "            {%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}\n"
    "            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n"
    "        {%- endif %}\n"
    "        {%- if loop.index0 > ns.last_query and reasoning %}\n"
    "            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content }}\n"
    "        {%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}\n{%- endif %}\n")

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

_QWEN_CONFIG = {"add_bos_token": False, "add_prefix_space": False, "bos_token": None, "clean_up_tokenization_spaces": False,
                "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>",
                "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}

FAMILIES: dict[str, Family] = {
    "llama3": Family(
        "llama3",
        ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|start_header_id|>",
         "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"),
        LLAMA3_SPLIT,
        {"bos_token": "<|begin_of_text|>", "clean_up_tokenization_spaces": True, "eos_token": "<|eot_id|>",
         "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
         "tokenizer_class": "PreTrainedTokenizerFast"},
        LLAMA3_TEMPLATE, bos="<|begin_of_text|>",
        config_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
        generation={"bos_token_id": "<|begin_of_text|>", "do_sample": True,
                    "eos_token_id": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], "temperature": 0.6,
                    "top_p": 0.9}),
    "llama2": Family(
        "llama2", ("<unk>", "<s>", "</s>"), "",
        {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "clean_up_tokenization_spaces": False,
         "eos_token": "</s>", "legacy": False, "model_max_length": 4096, "pad_token": None,
         "tokenizer_class": "LlamaTokenizerFast", "unk_token": "<unk>"},
        LLAMA2_TEMPLATE, bos="<s>", byte_fallback=True, config_eos=("</s>",),
        generation={"bos_token_id": "<s>", "eos_token_id": "</s>", "pad_token_id": 0, "do_sample": True,
                    "temperature": 0.6, "top_p": 0.9}),
    "qwen2": Family(
        "qwen2", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), QWEN2_SPLIT,
        {**_QWEN_CONFIG, "eos_token": "<|im_end|>"}, QWEN2_TEMPLATE, nfc=True, config_eos=("<|im_end|>",),
        generation={"bos_token_id": "<|endoftext|>", "do_sample": True, "eos_token_id": ["<|im_end|>", "<|endoftext|>"],
                    "pad_token_id": "<|endoftext|>", "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20,
                    "top_p": 0.8}),
    "qwen3": Family(
        "qwen3", ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"), QWEN2_SPLIT,
        {**_QWEN_CONFIG, "eos_token": "<|im_end|>"}, QWEN3_TEMPLATE, nfc=True, config_eos=("<|im_end|>",),
        generation={"bos_token_id": "<|endoftext|>", "do_sample": True, "eos_token_id": ["<|im_end|>", "<|endoftext|>"],
                    "pad_token_id": "<|endoftext|>", "temperature": 0.6, "top_k": 20, "top_p": 0.95}),
}
NOT_SPECIAL = {"<think>", "</think>"}  # Qwen3 ships these as added tokens with "special": false


@lru_cache(maxsize=None)
def build_tokenizer(name: str, vocab_size: int = 640) -> Tokenizer:
    """The family's tokenizer (a fresh copy each call is not needed: treat it as read-only)."""
    fam = FAMILIES[name]
    if fam.byte_fallback:
        return _build_byte_fallback(fam, vocab_size)
    tok = Tokenizer(models.BPE(ignore_merges=name == "llama3"))
    if fam.nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(fam.split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    for text in fam.specials:  # in the declared order, after the learned vocabulary
        token = AddedToken(text, special=text not in NOT_SPECIAL, normalized=False)
        (tok.add_special_tokens if token.special else tok.add_tokens)([token])
    byte_level = processors.ByteLevel(trim_offsets=False)
    if fam.bos is not None:
        bos_id = tok.token_to_id(fam.bos)
        tok.post_processor = processors.Sequence([byte_level, processors.TemplateProcessing(
            single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B:1", special_tokens=[(fam.bos, bos_id)])])
    else:
        tok.post_processor = byte_level
    return tok


def _build_byte_fallback(fam: Family, vocab_size: int) -> Tokenizer:
    """A Llama-2 / Mistral style `tokenizer.json`: specials at ids 0-2, BPE over `▁`-marked words
    with byte fallback (`<0x00>` .. `<0xFF>` in the model's vocabulary), a Metaspace pre-tokenizer,
    the sentencepiece decoder chain, and BOS added by `TemplateProcessing`."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size - 256, special_tokens=list(fam.specials), show_progress=False, limit_alphabet=80))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B:1", special_tokens=[(fam.bos, tok.token_to_id(fam.bos))])
    return tok


def token_id(name: str, token: str) -> int:
    tid = build_tokenizer(name).token_to_id(token)
    assert tid is not None, f"{token!r} is not a token of {name}"
    return tid


def byte_token_ids(tokenizer: Tokenizer) -> dict[int, int]:
    """Byte value -> id of the token that is that one byte (`<0xE4>` with byte fallback; ByteLevel
    spells byte b as GPT-2's printable stand-in character for b)."""
    if tokenizer.token_to_id("<0xE4>") is not None:
        return {b: tokenizer.token_to_id(f"<0x{b:02X}>") for b in range(256)}
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelled, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelled[b] = chr(b)
        else:
            spelled[b] = chr(256 + extra)
            extra += 1
    return {b: tokenizer.token_to_id(c) for b, c in spelled.items()}


def checkpoint_ids(name: str) -> dict:
    """What the family's `config.json` says about the tokenizer: `vocab_size`, `bos_token_id`, `eos_token_id`."""
    fam = FAMILIES[name]
    eos = [token_id(name, t) for t in fam.config_eos]
    bos = token_id(name, fam.generation["bos_token_id"])
    return {"vocab_size": build_tokenizer(name).get_vocab_size(), "bos_token_id": bos,
            "eos_token_id": eos[0] if len(eos) == 1 else eos}


def generation_config(name: str, **overrides) -> dict:
    """The family's `generation_config.json`, token strings replaced by their ids."""
    gen = {**FAMILIES[name].generation, **overrides}
    for key in ("bos_token_id", "pad_token_id", "eos_token_id"):
        value = gen.get(key)
        if isinstance(value, str):
            gen[key] = token_id(name, value)
        elif isinstance(value, list):
            gen[key] = [token_id(name, v) if isinstance(v, str) else v for v in value]
    return gen


def write_tokenizer(out: str | Path, name: str, *, config: bool = False, generation: dict | None = None,
                    **tokenizer_config) -> Path:
    """Write the family's `tokenizer.json` and `tokenizer_config.json` (plus `config.json` with only
    the tokenizer ids when `config`, and `generation_config.json` when `generation` is given: pass
    `generation_config(name)` for the family's own). `tokenizer_config` overrides keys of the
    shipped config (a value of None removes the key). Returns `out`."""
    fam = FAMILIES[name]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(name)
    tok.save(str(out / "tokenizer.json"))
    added = {str(t_id): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": t.special}
             for t_id, t in sorted(tok.get_added_tokens_decoder().items())}
    cfg = {"added_tokens_decoder": added, **fam.tokenizer_config, "chat_template": fam.chat_template}
    for key, value in tokenizer_config.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    if config:
        (out / "config.json").write_text(json.dumps(checkpoint_ids(name), indent=2))
    if generation is not None:
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out


def stream(tokenizer, prompt: Sequence[int], outputs: Sequence[int], chunks: Sequence[int] = ()) -> tuple:
    """Feed `outputs` to `tokenizer.detokenizer(prompt)` in chunks of the given sizes (then one at
    a time), then flush: `(text, pieces, detokenizer)`. Works for any of our tokenizers."""
    d = tokenizer.detokenizer(prompt)
    pieces, k, sizes = [], 0, list(chunks)
    while k < len(outputs):
        n = max(1, sizes.pop(0)) if sizes else 1
        pieces.append(d.step(outputs[k:k + n]))
        k += n
    pieces.append(d.flush())
    return "".join(pieces), pieces, d
