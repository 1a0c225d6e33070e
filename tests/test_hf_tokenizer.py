"""`tokenizer.json` checkpoints (Llama-3, Qwen2.5, Qwen3 style) against transformers' own tokenizer.

The oracle is `transformers.AutoTokenizer.from_pretrained(dir)` on the same files: text prompts
and chat prompts must encode to exactly its ids, and the streamed text of any ids must
concatenate to exactly `decode` (which must equal transformers' decode).
"""
from __future__ import annotations

import json
import shutil
from importlib.resources import files
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")
from hf_tokenizer_fixtures import (FAMILIES, byte_token_ids, generation_config, stream, token_id,  # noqa: E402
                                   write_tokenizer)

from esp.engine.generation_defaults import GenerationDefaults  # noqa: E402
from esp.engine.sampling_params import SamplingParams  # noqa: E402
from esp.engine.tokenizer import Tokenizer  # noqa: E402
from esp.engine.tokenizer_hf import HFTokenizer, StreamDecoder  # noqa: E402

NAMES = list(FAMILIES)
HYP = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.function_scoped_fixture])
SAMPLES = [
    "Return the number of items in the container.",
    "  two leading spaces,\ttabs\tand\nnew\n\nlines  ",
    "Café naïve résumé Ærøskøbing façade",
    "中文分词测试，日本語のテキスト、한국어 문장",
    "新しい漢字：龍、鳳、麒麟；한글 자모 ㄱㄴㄷ",
    "emoji 🙂👍🏽 and flags 🇫🇷 and ZWJ 👩‍👩‍👧",
    "math ∑∫√∞ ≠ ≤ and arrows → ⇒, digits 1234567890",
    "specials as text: <|im_start|>user\n<|eot_id|> <|begin_of_text|> <think> </s><s>[INST]",
    " ",
]
PIECES = ["the", " quick", "Hello", " ", "\n", "\t", "  ", "你好", "世界", "🙂", "👩‍👩‍👧", "🇫🇷", "é", "ø", "€",
          "<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|begin_of_text|>", "<think>", "<s>", "</s>", "[INST]", "12345",
          "'s", "...", "ß"]
TEXT = st.lists(st.one_of(st.sampled_from(PIECES), st.characters(codec="utf-8")), max_size=24).map("".join)
CHATS = [
    [{"role": "user", "content": "Hi 🙂 there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "中文分词测试"},
     {"role": "assistant", "content": "好的。"}, {"role": "user", "content": "emoji 👩‍👩‍👧 and 🇫🇷?"}],
    [{"role": "user", "content": "  padded  \n"}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nSure."},
     {"role": "user", "content": "literal <|im_end|> and <|eot_id|> inside"}],
]


@pytest.fixture(scope="module")
def pair(request, tmp_path_factory):
    """(ours, transformers') for a family with its shipped configuration."""
    name = request.param
    d = write_tokenizer(tmp_path_factory.mktemp(name), name, config=True, generation=generation_config(name))
    return Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)


def load_both(path: Path) -> tuple[Tokenizer, object]:
    return Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)


def hf_chat_ids(hf, messages) -> list[int]:
    out = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def assert_stream_contract(tok: Tokenizer, prompt: list[int], outputs: list[int], chunks=()) -> list[str]:
    text, pieces, d = stream(tok, prompt, outputs, chunks)
    head = tok.decode(prompt)
    assert head[:len(head) - d.prompt_carry] + text == tok.decode(prompt + outputs)
    return pieces


# -- loading ----------------------------------------------------------------------------------
@pytest.mark.parametrize("pair", NAMES, indirect=True)
def test_loads_through_tokenizers_with_the_families_special_tokens(pair):
    ours, hf = pair
    assert isinstance(ours, HFTokenizer)
    assert ours.vocab_size == len(hf)
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.add_bos == (hf.bos_token_id is not None)


def test_tokenizer_json_is_preferred_over_tokenizer_model(tmp_path):
    d = write_tokenizer(tmp_path, "llama3")
    shutil.copy(Path(str(files("esp.engine") / "models" / "esp-tiny" / "tokenizer.model")), d / "tokenizer.model")
    assert isinstance(Tokenizer.from_dir(d), HFTokenizer)
    (d / "tokenizer.json").unlink()
    assert type(Tokenizer.from_dir(d)).__name__ == "SentencePieceTokenizer"


@pytest.mark.parametrize("breakage, match", [
    (lambda d: (d / "tokenizer.json").write_text("{not json"), r"tokenizer\.json: the tokenizers library"),
    (lambda d: (d / "tokenizer_config.json").write_text("[1, 2"), r"tokenizer_config\.json: not valid JSON"),
    (lambda d: (d / "generation_config.json").write_text('{"top_p": 0}'), r"generation_config\.json: top_p"),
    (lambda d: (d / "chat_template.jinja").write_text("{% for %}"), r"chat_template\.jinja: the chat template"),
    (lambda d: write_tokenizer(d, "llama3", bos_token="<s>"), r"tokenizer_config\.json: bos_token '<s>' is not"),
])
def test_broken_directories_name_the_file(tmp_path, breakage, match):
    d = write_tokenizer(tmp_path, "llama3")
    breakage(d)
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_dir(d)


def test_truncation_and_padding_saved_in_tokenizer_json_are_ignored_like_transformers(tmp_path):
    d = write_tokenizer(tmp_path, "qwen2")
    spec = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    spec["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    spec["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                       "pad_type_id": 0, "pad_token": "<|endoftext|>"}
    (d / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    ours, hf = load_both(d)
    text = " ".join(SAMPLES)
    assert len(ours.encode(text)) > 64 and ours.encode(text) == hf.encode(text)
    assert ours.encode("hi") == hf.encode("hi") and len(ours.encode("hi")) < 8


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_dir(tmp_path)


# -- encoding ---------------------------------------------------------------------------------
@pytest.mark.parametrize("pair", NAMES, indirect=True)
def test_text_prompts_encode_like_transformers(pair):
    ours, hf = pair
    for text in SAMPLES:
        assert ours.encode(text) == hf(text)["input_ids"] == hf.encode(text), text


@pytest.mark.parametrize("pair", NAMES, indirect=True)
@HYP
@given(text=TEXT)
def test_any_text_encodes_like_transformers(pair, text):
    ours, hf = pair
    bos = ours.special_tokens().get("bos_token")
    assume(not (ours.add_bos and text.startswith(bos)))  # the one deliberate difference, tested below
    assert ours.encode(text) == hf(text)["input_ids"]


@pytest.mark.parametrize("pair", NAMES, indirect=True)
def test_chat_prompts_encode_like_transformers(pair):
    ours, hf = pair
    for messages in CHATS:
        text = ours.apply_chat_template(messages)
        ids = ours.encode(text)
        assert ids == hf_chat_ids(hf, messages)
        rendered = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text == rendered
        assert "<|im_start|>" not in ours.decode(ids) and "<|start_header_id|>" not in ours.decode(ids)


FEATURES_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(users=0) %}{% for m in messages[::-1] %}{% if m.role == 'user' %}"
    "{% set ns.users = ns.users + 1 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('role') }}"
    "{% endif %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content | trim }}{% endgeneration %}"
    "{% else %}{{ {'text': m.content, 'n': ns.users} | tojson }}{% endif %}<|eot_id|>"
    "{% if loop.index >= 3 %}{% break %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def test_template_features_render_like_transformers(tmp_path):
    """chat_template.jinja wins over tokenizer_config.json; namespace, break, the generation tag
    and a tojson that keeps non-ASCII and HTML characters all render as transformers renders them."""
    d = write_tokenizer(tmp_path, "llama3")
    (d / "chat_template.jinja").write_text(FEATURES_TEMPLATE, encoding="utf-8")
    ours, hf = load_both(d)
    for messages in CHATS:
        text = ours.apply_chat_template(messages)
        assert text == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours.encode(text) == hf_chat_ids(hf, messages)
    assert '"text": "中文分词测试"' in ours.apply_chat_template(CHATS[1])


@pytest.mark.parametrize("name, overrides", [
    ("llama3", {}), ("llama3", {"add_bos_token": False}), ("llama3", {"add_bos_token": True}),
    ("llama3", {"add_eos_token": True}), ("qwen2", {}), ("qwen2", {"add_bos_token": None}),
    ("qwen2", {"add_bos_token": True, "bos_token": "<|endoftext|>"}),
])
def test_bos_follows_the_post_processor_like_transformers(tmp_path, caplog, name, overrides):
    """transformers 5 lets `tokenizer.json`'s post-processor decide and ignores `add_bos_token`
    there; so do we, with a warning when the two disagree."""
    ours, hf = load_both(write_tokenizer(tmp_path, name, **overrides))
    bos = ours.bos_token_id
    for text in SAMPLES[:3]:
        assert ours.encode(text) == hf.encode(text)
    assert ours.encode("hi", add_bos=False) == hf.encode("hi", add_special_tokens=False)
    if bos is not None:
        assert ours.encode("hi", add_bos=True)[0] == bos
    for messages in CHATS:
        ids = ours.encode(ours.apply_chat_template(messages))
        assert ids == hf_chat_ids(hf, messages)
        assert ids[:2] != [bos, bos]
    disagrees = bos is not None and overrides.get("add_bos_token", ours.add_bos) != ours.add_bos
    assert ("add_bos_token is" in caplog.text) == disagrees


@pytest.mark.parametrize("name, bos", [("llama3", "<|begin_of_text|>"), ("llama2", "<s>")])
def test_never_a_double_bos(tmp_path, name, bos):
    ours, hf = load_both(write_tokenizer(tmp_path, name))
    bos_id = token_id(name, bos)
    text = f"{bos}Hello there"
    assert hf.encode(text)[:2] == [bos_id, bos_id]  # transformers doubles it
    assert ours.encode(text) == hf.encode(text)[1:]
    for messages in CHATS:
        chat = ours.encode(ours.apply_chat_template(messages))
        assert chat[0] == bos_id and chat[1] != bos_id


# -- decoding and streaming ---------------------------------------------------------------------
@pytest.mark.parametrize("pair", NAMES, indirect=True)
def test_multibyte_characters_split_across_tokens_stream_whole(pair):
    ours, hf = pair
    split = 0
    for text in SAMPLES:
        ids = ours.encode(text, add_bos=False)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        pieces = assert_stream_contract(ours, [], ids)
        assert not any("\ufffd" in p for p in pieces), pieces
        split += any("\ufffd" in ours.decode([i]) for i in ids)
    assert split >= 3, "the emoji, math and new-CJK samples should split characters across tokens"
    emoji = ours.encode("👩‍👩‍👧🙂", add_bos=False)
    assert len(emoji) > 3 and "".join(stream(ours, [], emoji)[1]) == "👩‍👩‍👧🙂"


@pytest.mark.parametrize("pair", NAMES, indirect=True)
@HYP
@given(data=st.data(), text=TEXT)
def test_stream_after_any_prompt_split_and_chunking(pair, data, text):
    ours, _ = pair
    ids = ours.encode(text)
    k = data.draw(st.integers(0, len(ids)))
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=len(ids)))
    assert_stream_contract(ours, ids[:k], ids[k:], chunks)


@pytest.mark.parametrize("pair", NAMES, indirect=True)
@HYP
@given(data=st.data())
def test_stream_of_arbitrary_ids(pair, data):
    ours, hf = pair
    high_bytes = [t for b, t in byte_token_ids(ours.backend).items() if b >= 0x80]
    specials = sorted(ours.backend.get_added_tokens_decoder())
    # byte and special tokens often enough for runs longer than MAX_HELD of held-back tokens
    ident = st.one_of(st.integers(0, ours.vocab_size - 1), st.sampled_from(high_bytes), st.sampled_from(specials))
    prompt = data.draw(st.lists(ident, max_size=6))
    outputs = data.draw(st.lists(ident, max_size=80))
    chunks = data.draw(st.lists(st.integers(1, 5), max_size=20))
    assert_stream_contract(ours, prompt, outputs, chunks)
    assert ours.decode(outputs) == hf.decode(outputs, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("name, end", [("qwen2", "<|im_end|>"), ("llama2", "</s>")])
def test_long_runs_of_held_tokens_stream_exactly_in_a_bounded_window(tmp_path, name, end):
    """Runs longer than MAX_HELD of undecodable bytes, of special tokens and (byte fallback: one
    run) of valid multi-byte characters."""
    ours = Tokenizer.from_dir(write_tokenizer(tmp_path, name))
    byte, n = byte_token_ids(ours.backend), StreamDecoder.MAX_HELD + 40
    family = ours.encode("👩‍👩‍👧" * 20, add_bos=False)
    runs = [[byte[0x80]] * n + [byte[0xE4]] * n + [byte[0xBD], byte[0xA0]], [token_id(name, end)] * n,
            ours.encode(" ok", add_bos=False), family, ours.encode(" ok", add_bos=False)]
    outputs = [i for run in runs for i in run]
    d = ours.detokenizer([])
    pieces, window = [], 0
    for i in outputs:
        pieces.append(d.step([i]))
        window = max(window, len(d._ids))
    pieces.append(d.flush())
    assert "".join(pieces) == ours.decode(outputs)
    assert pieces[-1] == "" and "".join(pieces).endswith("👩‍👩‍👧 ok")
    assert window <= 2 * StreamDecoder.MAX_HELD + 2


def test_ids_past_the_tokenizer_render_nothing_and_negative_ids_raise(tmp_path):
    ours = Tokenizer.from_dir(write_tokenizer(tmp_path, "qwen2"))
    hello = ours.encode("Hello", add_bos=False)
    assert ours.decode(hello + [ours.vocab_size + 5]) == "Hello"
    assert ours.detokenizer(hello).step([ours.vocab_size + 5]) == ""
    with pytest.raises(ValueError, match="out of range"):
        ours.decode([-1])


# -- stop tokens and sampling defaults ------------------------------------------------------------
def test_eos_ids_are_the_union_of_all_three_files(tmp_path):
    d = write_tokenizer(tmp_path, "llama3", eos_token="<|eot_id|>")
    (d / "config.json").write_text(json.dumps({"eos_token_id": token_id("llama3", "<|end_of_text|>")}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [token_id("llama3", "<|eom_id|>")]}))
    assert Tokenizer.from_dir(d).eos_token_ids == {token_id("llama3", t)
                                                   for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")}


@pytest.mark.parametrize("name, expected", [
    ("llama3", GenerationDefaults(temperature=0.6, top_p=0.9)),
    ("qwen2", GenerationDefaults(temperature=0.7, top_p=0.8, top_k=20)),
    ("qwen3", GenerationDefaults(temperature=0.6, top_p=0.95, top_k=20)),
])
def test_generation_config_sampling_defaults(tmp_path, name, expected):
    tok = Tokenizer.from_dir(write_tokenizer(tmp_path, name, generation=generation_config(name)))
    assert tok.generation_defaults == expected
    params = tok.generation_defaults.sampling_params(max_tokens=5, temperature=None)
    assert (params.temperature, params.top_p, params.top_k) == (expected.temperature, expected.top_p,
                                                                expected.top_k or 0)
    assert tok.generation_defaults.sampling_params(temperature=0).temperature == 0
    bare = Tokenizer.from_dir(write_tokenizer(tmp_path / "bare", name))
    assert bare.generation_defaults == GenerationDefaults()
    assert bare.generation_defaults.sampling_params(max_tokens=5) == SamplingParams(max_tokens=5)
