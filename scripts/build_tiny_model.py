"""Build `esp-tiny`, the small Llama checkpoint bundled in `engine/models/esp-tiny/`.

Everything comes from material available offline, and the result depends only on the
flags, the Python version (whose standard library is the corpus) and the torch build:

1. corpus: the module/class/function docstrings of every `.py` file of the standard
   library (sorted paths, source order), optionally plus this repo's Markdown docs;
2. tokenizer: a Llama-style sentencepiece BPE model (byte fallback, unk=0, <s>=1, </s>=2);
3. weights: `transformers.LlamaForCausalLM` (GQA, SwiGLU, RoPE, 32K positions) trained from a
   fixed seed on CPU for a fixed number of steps with AdamW and warmup + cosine decay;
4. output: `config.json`, `generation_config.json`, `model.safetensors` (bfloat16),
   `tokenizer.model`, `tokenizer_config.json`, then greedy and sampled samples printed.

Run from the repo root (needs the `build` extra, i.e. transformers):

    .venv/bin/python scripts/build_tiny_model.py
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import math
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "engine" / "models" / "esp-tiny"
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
KEEP_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
              "tokenizer_config.json")


@dataclass(frozen=True)
class BuildConfig:
    """Every knob of the build; the defaults produce the bundled checkpoint."""

    out: Path = DEFAULT_OUT
    seed: int = 1234
    corpus_mb: float = 4.0
    repo_docs: bool = False
    vocab_size: int = 4096
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 2
    intermediate: int = 704
    seq_len: int = 256
    batch: int = 16
    steps: int = 450
    warmup: int = 30
    lr: float = 2.5e-3
    min_lr: float = 2.5e-4
    weight_decay: float = 0.1
    threads: int = 2
    max_minutes: float = 0.0


def parse_args(argv: list[str] | None) -> BuildConfig:
    d = BuildConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=d.out, help="output folder (replaced)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--corpus-mb", type=float, default=d.corpus_mb, help="corpus size cap in MB of UTF-8")
    p.add_argument("--repo-docs", action="store_true",
                   help="also train on README.md and docs/*.md (the checkpoint then depends on them)")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--kv-heads", type=int, default=d.kv_heads)
    p.add_argument("--intermediate", type=int, default=d.intermediate)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (the result depends on this, "
                                                               "never on wall time)")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr", type=float, default=d.min_lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--max-minutes", type=float, default=d.max_minutes,
                   help="abort (without saving) if training would exceed this; 0 = no limit")
    a = p.parse_args(argv)
    return BuildConfig(**{k.replace("-", "_"): v for k, v in vars(a).items()})


# -- corpus ------------------------------------------------------------------------------
def _docstrings(tree: ast.AST) -> list[str]:
    """Docstrings of the module, classes and functions of `tree`, in source order."""
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc.split()) >= 3:
                out.append(doc.strip())
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def stdlib_documents() -> list[str]:
    """Docstrings of the standard library's own `.py` files (tests and site-packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue
        docs.extend(_docstrings(tree))
    return docs


def repo_documents() -> list[str]:
    paths = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    return [p.read_text(encoding="utf-8").strip() for p in paths if p.is_file()]


def collect_corpus(cfg: BuildConfig) -> list[str]:
    """Documents in a fixed order, deduplicated, capped at `corpus_mb` MB of UTF-8."""
    docs = (repo_documents() if cfg.repo_docs else []) + stdlib_documents()
    seen: set[str] = set()
    out: list[str] = []
    budget = int(cfg.corpus_mb * 1e6)
    for doc in docs:
        if doc in seen:
            continue
        seen.add(doc)
        budget -= len(doc.encode("utf-8"))
        if budget < 0:
            break
        out.append(doc)
    return out


# -- tokenizer ---------------------------------------------------------------------------
def train_tokenizer(docs: list[str], vocab_size: int) -> bytes:
    """A serialized Llama-style sentencepiece BPE model trained on the lines of `docs`."""
    lines = [line for doc in docs for line in doc.split("\n") if line.strip()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        split_digits=True, allow_whitespace_only_pieces=True, character_coverage=0.9995,
        max_sentence_length=16384, input_sentence_size=0, shuffle_input_sentence=False,
        num_threads=1, minloglevel=2)
    return buf.getvalue()


# -- data --------------------------------------------------------------------------------
def pack(docs: list[str], sp: spm.SentencePieceProcessor, seq_len: int) -> torch.Tensor:
    """`[n, seq_len + 1]` int64 windows of the stream `<s> doc </s> <s> doc </s> ...`."""
    stream: list[int] = []
    for ids in sp.encode(docs):
        stream += [sp.bos_id(), *ids, sp.eos_id()]
    n = (len(stream) - 1) // seq_len
    t = torch.tensor(stream[: n * seq_len + 1], dtype=torch.int64)
    return torch.cat([t[:-1].view(n, seq_len), t[seq_len::seq_len].view(n, 1)], dim=1)


def lr_at(step: int, cfg: BuildConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, frac)))


# -- model -------------------------------------------------------------------------------
def make_model(cfg: BuildConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.hidden // cfg.heads, hidden_act="silu", max_position_embeddings=32768,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=None, initializer_range=0.02)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def evaluate(model, data: torch.Tensor, batch: int) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), batch):
            x = data[i: i + batch]
            logits = model(input_ids=x[:, :-1]).logits
            total += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum").item()
            count += x[:, 1:].numel()
    model.train()
    return total / count


def train(model, train_data: torch.Tensor, val_data: torch.Tensor, cfg: BuildConfig) -> dict:
    """Train for exactly `cfg.steps` steps; returns the losses reached."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    order = torch.randperm(len(train_data), generator=gen)
    cursor, ema, start = 0, None, time.monotonic()
    model.train()
    for step in range(cfg.steps):
        if cursor + cfg.batch > len(order):
            order, cursor = torch.randperm(len(train_data), generator=gen), 0
        x = train_data[order[cursor: cursor + cfg.batch]]
        cursor += cfg.batch
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        elapsed = time.monotonic() - start
        if step % 25 == 0 or step == cfg.steps - 1:
            print(f"step {step:4d}/{cfg.steps}  loss {loss.item():.3f}  ema {ema:.3f}  "
                  f"lr {lr_at(step, cfg):.2e}  {elapsed:6.1f}s", flush=True)
        if cfg.max_minutes and step >= 4 and elapsed / (step + 1) * cfg.steps > cfg.max_minutes * 60:
            raise SystemExit(f"training would take ~{elapsed / (step + 1) * cfg.steps / 60:.1f} min, over "
                             f"--max-minutes {cfg.max_minutes}: lower --steps or the model size")
    return {"train_loss_ema": round(ema, 4), "val_loss": round(evaluate(model, val_data, cfg.batch), 4),
            "train_seconds": round(time.monotonic() - start, 1)}


# -- output ------------------------------------------------------------------------------
def save(model, sp_bytes: bytes, cfg: BuildConfig) -> None:
    if cfg.out.exists():
        shutil.rmtree(cfg.out)
    model.to(torch.bfloat16).save_pretrained(cfg.out, safe_serialization=True)
    (cfg.out / "tokenizer.model").write_bytes(sp_bytes)
    tok_config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                  "unk_token": "<unk>", "pad_token": None, "model_max_length": 32768,
                  "clean_up_tokenization_spaces": False, "legacy": False, "tokenizer_class": "LlamaTokenizer"}
    (cfg.out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    for extra in sorted(cfg.out.iterdir()):
        if extra.name not in KEEP_FILES:
            shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
        else:
            extra.chmod(0o644)


def show_samples(out: Path) -> None:
    """Reload the saved checkpoint with transformers and print greedy and sampled continuations."""
    from transformers import LlamaForCausalLM

    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.manual_seed(0)
    for prompt in ("Return the", "This module provides", "The default value of"):
        ids = torch.tensor([[sp.bos_id(), *sp.encode(prompt)]])
        for sample in (False, True):
            kw = {"do_sample": True, "temperature": 0.8, "top_k": 40} if sample else {"do_sample": False}
            with torch.no_grad():
                out_ids = model.generate(ids, max_new_tokens=40, pad_token_id=sp.eos_id(), **kw)
            text = sp.decode(out_ids[0, ids.shape[1]:].tolist())
            print(f"[{'sampled' if sample else 'greedy '}] {prompt!r} -> {text!r}")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True)
    t0 = time.monotonic()

    docs = collect_corpus(cfg)
    text_bytes = sum(len(d.encode("utf-8")) for d in docs)
    digest = hashlib.sha256("\0".join(docs).encode("utf-8")).hexdigest()[:16]
    print(f"corpus: {len(docs)} documents, {text_bytes / 1e6:.2f} MB, sha256 {digest} "
          f"(Python {sys.version.split()[0]})", flush=True)

    sp_bytes = train_tokenizer(docs, cfg.vocab_size)
    sp = spm.SentencePieceProcessor(model_proto=sp_bytes)
    data = pack(docs, sp, cfg.seq_len)
    n_val = max(1, len(data) // 50)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed))
    val_data, train_data = data[perm[:n_val]], data[perm[n_val:]]
    tokens = data.numel()
    print(f"tokenizer: vocab {sp.get_piece_size()}, {tokens / 1e6:.2f}M tokens "
          f"({text_bytes / tokens:.2f} bytes/token), {len(train_data)} train / {n_val} val windows of "
          f"{cfg.seq_len}; sha256 {hashlib.sha256(sp_bytes).hexdigest()[:16]}  {time.monotonic() - t0:.1f}s",
          flush=True)

    model = make_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    seen = cfg.steps * cfg.batch * cfg.seq_len
    print(f"model: {n_params / 1e6:.2f}M parameters; training {cfg.steps} steps x {cfg.batch} x {cfg.seq_len} "
          f"= {seen / 1e6:.2f}M tokens ({seen / train_data.numel():.2f} epochs)", flush=True)
    result = train(model, train_data, val_data, cfg)
    print(f"result: {json.dumps(result)}", flush=True)

    save(model, sp_bytes, cfg)
    size = sum(p.stat().st_size for p in cfg.out.iterdir())
    print(f"saved {sorted(p.name for p in cfg.out.iterdir())} to {cfg.out} ({size / 1e6:.2f} MB)", flush=True)
    show_samples(cfg.out)
    print(f"total {time.monotonic() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
