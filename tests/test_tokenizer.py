"""The tokenizer and the bundled esp-tiny checkpoint.

Oracles: the original text (round trips), sentencepiece's own C++ decoder (`SentencePieceProcessor`
used directly) for every streamed sequence, and hand-written expected strings for chat prompts.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

import pytest
import sentencepiece as spm
from hf_tokenizer_fixtures import stream as stream_with
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esp.engine.tokenizer import Tokenizer, fallback_chat_prompt
from esp.engine.tokenizer_sp import IncrementalDetokenizer

MODEL_DIR = Path(str(files("esp.engine") / "models" / "esp-tiny"))
SP = spm.SentencePieceProcessor(model_file=str(MODEL_DIR / "tokenizer.model"))
TOK = Tokenizer.from_dir(MODEL_DIR)
BYTE = {int(SP.id_to_piece(i)[3:5], 16): i for i in range(SP.get_piece_size()) if SP.is_byte(i)}
HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SAMPLES = [
    "Return the number of items in the container.",
    "  two leading spaces,\ttabs\tand\nnew\n\nlines  ",
    "Café naïve résumé Ærøskøbing façade",
    "中文分词测试，日本語のテキスト、한국어 문장",
    "emoji 🙂👍🏽 and flags 🇫🇷 and ZWJ 👩‍👩‍👧",
    "math ∑∫√∞ ≠ ≤ and arrows → ⇒, digits 1234567890",
    " ",
    "",
]


Streamed = tuple[str, list[str], IncrementalDetokenizer]


def stream(prompt: Sequence[int], outputs: Sequence[int], chunks: Sequence[int] = ()) -> Streamed:
    """Feed `outputs` after `prompt` in chunks of the given sizes (then one at a time)."""
    return stream_with(TOK, prompt, outputs, chunks)


def as_bytes(text: str) -> list[int]:
    """Token ids that spell `text` with byte-fallback tokens only."""
    return [BYTE[b] for b in text.encode("utf-8")]


# -- the bundled checkpoint -----------------------------------------------------------------
def test_bundled_checkpoint_files_and_config():
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= names
    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) < 20 * 2**20
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["max_position_embeddings"] == 32768
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["vocab_size"]) == (1, 2, SP.get_piece_size())
    assert (SP.unk_id(), SP.bos_id(), SP.eos_id(), SP.pad_id()) == (0, 1, 2, -1)
    assert len(BYTE) == 256


def test_bundled_model_predicts_english():
    """The checkpoint is a trained language model: its loss on unseen docstring-like English is far
    below uniform guessing (ln 4096 = 8.3), and greedy decoding yields words, not noise."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    text = ("Return a new list containing the values of the given iterable. If the argument is "
            "omitted, the function returns an empty list. Raise ValueError if the value is invalid.")
    ids = torch.tensor([TOK.encode(text)])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
        out = model.generate(torch.tensor([TOK.encode("Return the")]), max_new_tokens=24, do_sample=False,
                             pad_token_id=2)
    assert loss < 5.0
    words = TOK.decode(out[0, 3:].tolist()).split()
    assert len(words) >= 4 and sum(w.strip(".,:;()'\"`").isalpha() for w in words) >= len(words) // 2


# -- encode / decode --------------------------------------------------------------------------
@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_and_bos(text):
    ids = TOK.encode(text)
    assert ids[0] == TOK.bos_token_id == 1 and ids[1:] == SP.encode(text)
    assert TOK.encode(text, add_bos=False) == ids[1:]
    assert TOK.decode(ids) == TOK.decode(ids[1:]) == text


@HYP
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), max_size=60))
def test_round_trip_any_text(text):
    assert TOK.decode(TOK.encode(text)) == text


def test_special_tokens_and_vocab():
    assert TOK.vocab_size == SP.get_piece_size() == 4096
    assert TOK.eos_token_ids == frozenset({2})
    assert TOK.decode([1, *TOK.encode("hi", add_bos=False), 2, 2]) == "hi"
    with pytest.raises(ValueError, match="out of range"):
        TOK.decode([TOK.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        TOK.detokenizer([-1])
    with pytest.raises(TypeError):
        TOK.encode(b"bytes")  # type: ignore[arg-type]


@HYP
@given(st.lists(st.integers(0, 4095), max_size=40))
def test_ids_verbatim_decode_like_sentencepiece(ids):
    assert TOK.decode(ids) == SP.decode(ids)
    assert stream([], ids)[0] == SP.decode(ids)


# -- incremental detokenizer ------------------------------------------------------------------
@pytest.mark.parametrize("text", SAMPLES)
def test_stream_one_token_at_a_time(text):
    ids = TOK.encode(text)
    full, pieces, _ = stream([], ids)
    assert full == TOK.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("text", SAMPLES[2:6])
def test_stream_byte_tokens_never_split_characters(text):
    ids = as_bytes(text)
    full, pieces, _ = stream([], ids)
    assert full == SP.decode(ids) == text
    for p in pieces:
        assert "\ufffd" not in p
        assert p.encode("utf-8").decode("utf-8") == p


def mixed_spelling(data, text: str) -> list[int]:
    """`text` tokenized, with random tokens after the first respelled as byte-fallback tokens."""
    ids = SP.encode(text)
    out = ids[:1]
    for i in ids[1:]:
        if SP.is_byte(i) or not data.draw(st.booleans()):
            out.append(i)
        else:
            out += as_bytes(SP.id_to_piece(i).replace("\u2581", " "))
    return out


TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581\ufffd"),
               min_size=1, max_size=40)


@HYP
@given(data=st.data(), text=TEXT)
def test_stream_random_chunks_valid_utf8(data, text):
    ids = ([1] if data.draw(st.booleans()) else []) + mixed_spelling(data, text)
    chunks = data.draw(st.lists(st.integers(1, 5), max_size=len(ids)))
    full, pieces, _ = stream([], ids, chunks)
    assert full == SP.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


@HYP
@given(data=st.data(), text=TEXT)
def test_stream_after_prompt_continues_the_text(data, text):
    """The streamed text of outputs after a prompt is what the prompt's text grows by, including the
    leading space of the first output word."""
    ids = [1] + mixed_spelling(data, text)
    k = data.draw(st.integers(0, len(ids)))
    prompt, outputs = ids[:k], ids[k:]
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=len(outputs)))
    full, pieces, d = stream(prompt, outputs, chunks)
    head = SP.decode(prompt)
    assert head[:len(head) - d.prompt_carry] + full == SP.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


@HYP
@given(data=st.data())
def test_stream_arbitrary_ids_after_prompt(data):
    """Garbage too (lone bytes, EOS mid-stream, unk) streams exactly like sentencepiece decodes."""
    pool = st.one_of(st.integers(0, 4095), st.sampled_from(sorted(BYTE.values())), st.sampled_from([0, 1, 2]))
    ids = data.draw(st.lists(pool, max_size=30))
    k = data.draw(st.integers(0, len(ids)))
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=len(ids)))
    full, _, d = stream(ids[:k], ids[k:], chunks)
    head = SP.decode(ids[:k])
    assert head[:len(head) - d.prompt_carry] + full == SP.decode(ids)


def test_leading_space_of_first_output_word():
    ids = TOK.encode("Hello world")
    k = next(k for k in range(2, len(ids)) if SP.id_to_piece(ids[k]).startswith("\u2581"))
    d = TOK.detokenizer(ids[:k])
    assert d.step(ids[k:k + 1]).startswith(" ")
    d0 = TOK.detokenizer([1])
    assert d0.step(ids[1:2]) == SP.decode(ids[1:2]) and not SP.decode(ids[1:2]).startswith(" ")


def test_character_split_between_prompt_and_output():
    euro = as_bytes("€")
    prompt = TOK.encode("price ") + euro[:2]
    d = TOK.detokenizer(prompt)
    assert d.prompt_carry == 2
    assert d.step([euro[2]]) == "€"
    rest = TOK.encode(" 5", add_bos=False)
    assert "price €" + d.step(rest) + d.flush() == SP.decode(prompt + [euro[2]] + rest)


def test_incomplete_bytes_settle_on_flush_and_at_run_end():
    e2, x82 = BYTE[0xE2], BYTE[0x82]
    d = TOK.detokenizer([1])
    assert d.step([e2]) == "" and d.step([x82]) == ""
    assert d.flush() == "\ufffd\ufffd" == SP.decode([e2, x82])
    d = TOK.detokenizer([1])
    assert d.step([e2, 2]) == "\ufffd"
    assert d.step([x82]) == "\ufffd" and d.flush() == ""
    assert SP.decode([e2, 2, x82]) == "\ufffd\ufffd"


def test_special_tokens_not_rendered():
    d = TOK.detokenizer(TOK.encode("The end"))
    assert d.step([2]) == "" and d.step([1]) == "" and d.flush() == ""


class CountingIds(Sequence):
    """A long prompt that records which positions were read."""

    def __init__(self, head: list[int], fill: int, n: int, tail: list[int]) -> None:
        self.head, self.fill, self.n, self.tail, self.reads = head, fill, n, tail, set()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k):
        if isinstance(k, slice):
            raise TypeError("no slicing")
        k = k + self.n if k < 0 else k
        if not 0 <= k < self.n:
            raise IndexError(k)
        self.reads.add(k)
        if k < len(self.head):
            return self.head[k]
        if k >= self.n - len(self.tail):
            return self.tail[k - (self.n - len(self.tail))]
        return self.fill


def test_long_prompt_costs_constant_work():
    """A detokenizer for a million-token prompt reads only its first tokens and its last few."""
    word = TOK.encode("the", add_bos=False)[0]
    euro = as_bytes("€")
    prompt = CountingIds([1, 1, word], word, 1_000_000, euro[:2])
    d = TOK.detokenizer(prompt)
    assert len(prompt.reads) <= 8
    assert d.prompt_carry == 2 and d.step([euro[2]]) == "€"


# -- from_dir and chat prompts ----------------------------------------------------------------
def model_copy(tmp_path: Path, **files_: object) -> Path:
    shutil.copy(MODEL_DIR / "tokenizer.model", tmp_path / "tokenizer.model")
    for name, content in files_.items():
        path = tmp_path / name.replace("__", ".")
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return tmp_path


def test_from_dir_reads_bos_eos_and_add_bos(tmp_path):
    d = model_copy(tmp_path, config__json={"bos_token_id": 1, "eos_token_id": [2, 7]},
                   generation_config__json={"eos_token_id": 9}, tokenizer_config__json={"add_bos_token": False})
    tok = Tokenizer.from_dir(d)
    assert tok.eos_token_ids == frozenset({2, 7, 9})
    assert tok.encode("hi") == SP.encode("hi") and tok.encode("hi", add_bos=True)[0] == 1
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_dir(tmp_path / "missing")


def test_chat_fallback_format():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    expected = "system: Be brief.\nuser: Hi!\nassistant: Hello.\nuser: Bye\nassistant:"
    assert TOK.apply_chat_template(messages) == fallback_chat_prompt(messages) == expected


@pytest.mark.parametrize("messages, match", [
    ("hello", "non-empty list"),
    ([], "non-empty list"),
    (["hello"], r"messages\[0\] must be an object"),
    ([{"content": "x"}], r"messages\[0\].role"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "x"}], r"messages\[1\].role.*'tool'"),
    ([{"role": "user"}], r"messages\[0\].content must be a string, got nothing"),
    ([{"role": "user", "content": 3}], r"messages\[0\].content must be a string, got int"),
    ([{"role": 1, "content": "x"}], r"messages\[0\].role"),
])
def test_chat_validation_errors(messages, match):
    with pytest.raises(ValueError, match=match):
        TOK.apply_chat_template(messages)


TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system') }}"
            "{% endif %}[{{ m.role }}] {{ m.content }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")


def test_chat_template_from_tokenizer_config(tmp_path):
    pytest.importorskip("jinja2")
    tok = Tokenizer.from_dir(model_copy(tmp_path, tokenizer_config__json={"chat_template": TEMPLATE}))
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    assert text == "[user] Hi</s>\n[assistant] Yo</s>\n[assistant]"
    with pytest.raises(ValueError, match="no system"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


def test_chat_template_file_wins_and_bos_kept_without_add_bos(tmp_path):
    pytest.importorskip("jinja2")
    d = model_copy(tmp_path, chat_template__jinja="{{ bos_token }}{{ messages[-1].content }}!",
                   tokenizer_config__json={"chat_template": TEMPLATE, "add_bos_token": False})
    assert Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "Hi"}]) == "<s>Hi!"


def test_a_broken_tokenizer_model_names_the_file(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"tokenizer\.model: not a sentencepiece model"):
        Tokenizer.from_dir(tmp_path)
