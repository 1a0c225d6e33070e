"""Build the project's shipped traces (``traces/*.jsonl`` and ``traces/README.md``).

Reads the real length/arrival data under ``../shared/traces`` (see its READMEs) and writes
small JSONL files, one request per line: ``{"arrival_s": float, "input_len": int,
"output_len": int}`` (DESIGN section 8), plus ``"synthetic": true`` on synthesized LV-Eval
rows and ``"source"`` in ``mixed``. Only lengths and times are kept, never text.

Deterministic: every random choice uses ``random.Random`` with a fixed seed (Python's
``random`` stream is stable across versions), so a rerun gives byte-identical files.

    python scripts/build_traces.py [--src ../shared/traces] [--out traces]
"""

from __future__ import annotations

import argparse
import bisect
import csv
import datetime as dt
import json
import math
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SRC = REPO.parent / "shared" / "traces"
DEFAULT_OUT = REPO / "traces"

WINDOW_S = 600.0  # production traces: keep the first 10 minutes
LONGBENCH_OUTPUT = 128  # LongBench v2 output length (a short CoT + letter)
ZIPF_N, ZIPF_BIN, ZIPF_BINS = 2000, 1000, 200  # 2,000 requests, 1K-token bins up to 200K
ZIPF_OUT = (4, 512)
MIX_PER_SOURCE, MIX_MIN_IN, MIX_MIN_OUT = 1500, 16, 4

Row = dict  # {"arrival_s", "input_len", "output_len", optional extras}


def _req(arrival: float, inp: int, out: int, **extra) -> Row:
    return {"arrival_s": round(float(arrival), 6), "input_len": int(inp),
            "output_len": int(out), **extra}


def _csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------- datasets
def sharegpt(src: Path) -> list[Row]:
    rows = _csv(src / "sharegpt-loongserve" / "sharegpt_loongserve_lwm_1000.csv")
    rows.sort(key=lambda r: (float(r["arrival_s"]), int(r["idx"])))
    return [_req(float(r["arrival_s"]), int(r["input_len"]), int(r["output_len"])) for r in rows]


def leval(src: Path) -> list[Row]:
    rows = _csv(src / "leval" / "leval_lengths_llama2.csv")
    return [_req(0.0, int(r["input_len"]), int(r["output_len"]))
            for r in rows if r["input_len"] != "NA"]


def lveval(src: Path) -> list[Row]:
    """Synthesized: input = nominal_words * 1.28 * U(0.75, 1.5), clipped to [15.1K, 497.3K];
    output = U{5..60}; num_requests per (subset, level) row; then shuffled (seed 2)."""
    rng = random.Random(1)
    out: list[Row] = []
    for r in _csv(src / "lveval" / "lveval_en_composition.csv"):
        words = int(r["nominal_words"])
        for _ in range(int(r["num_requests"])):
            inp = round(words * 1.28 * rng.uniform(0.75, 1.5))
            out.append(_req(0.0, min(max(inp, 15_100), 497_300), rng.randint(5, 60),
                            synthetic=True))
    random.Random(2).shuffle(out)
    return out


def longbench_v2(src: Path) -> list[Row]:
    rows = _csv(src / "longbench-v2" / "longbench_v2_lengths_llama2.csv")
    return [_req(0.0, int(r["context_tokens"]) + int(r["question_tokens"]), LONGBENCH_OUTPUT)
            for r in rows if "NA" not in (r["context_tokens"], r["question_tokens"])]


def mixed(parts: dict[str, list[Row]]) -> list[Row]:
    """LoongServe's Mixed: 1,500 per source (prompt >= 16, output >= 4), random.seed(0)
    sample (with replacement via random.choices when fewer eligible), then shuffle."""
    rng = random.Random(0)  # same stream as random.seed(0), without touching global state
    out: list[Row] = []
    for name in ("sharegpt", "leval", "lveval"):
        ok = [r for r in parts[name]
              if r["input_len"] >= MIX_MIN_IN and r["output_len"] >= MIX_MIN_OUT]
        pick = (rng.sample(ok, MIX_PER_SOURCE) if len(ok) >= MIX_PER_SOURCE
                else rng.choices(ok, k=MIX_PER_SOURCE))
        extra = {"synthetic": True} if name == "lveval" else {}
        out += [_req(0.0, r["input_len"], r["output_len"], source=name, **extra) for r in pick]
    rng.shuffle(out)
    return out


def zipf(alpha: float, seed: int) -> list[Row]:
    """Binned Zipf: bin k in 1..200 with P(k) ∝ k^-alpha, input uniform in ((k-1)*1000, k*1000],
    so the support is 1..200,000 tokens; output uniform in {4..512}."""
    w = [k ** -alpha for k in range(1, ZIPF_BINS + 1)]
    cdf, acc = [], 0.0
    for x in w:
        acc += x
        cdf.append(acc / sum(w))
    rng = random.Random(seed)
    out = []
    for _ in range(ZIPF_N):
        k = min(bisect.bisect_right(cdf, rng.random()), ZIPF_BINS - 1) + 1
        out.append(_req(0.0, rng.randint((k - 1) * ZIPF_BIN + 1, k * ZIPF_BIN),
                        rng.randint(*ZIPF_OUT)))
    return out


def mooncake(src: Path, name: str) -> list[Row]:
    out, t0 = [], None
    with (src / "mooncake-fast25" / f"{name}_trace.jsonl").open() as f:
        for line in f:
            d = json.loads(line)
            t0 = d["timestamp"] if t0 is None else t0
            t = (d["timestamp"] - t0) / 1000.0
            if t < WINDOW_S:
                out.append(_req(t, d["input_length"], d["output_length"]))
    return out


def _ticks(ts: str) -> int:
    """'2023-11-16 18:17:03.9799600' -> integer 100 ns ticks (exact, no float parsing)."""
    whole, _, frac = ts.partition(".")
    sec = int(dt.datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").replace(
        tzinfo=dt.UTC).timestamp())
    return sec * 10_000_000 + int((frac + "0000000")[:7])


def azure(src: Path, kind: str) -> list[Row]:
    rows = _csv(src / "azure-llm-2023" / f"AzureLLMInferenceTrace_{kind}.csv")
    t0 = _ticks(rows[0]["TIMESTAMP"])
    out = []
    for r in rows:
        t = (_ticks(r["TIMESTAMP"]) - t0) / 1e7
        if t < WINDOW_S:
            out.append(_req(t, max(1, int(r["ContextTokens"])), max(1, int(r["GeneratedTokens"]))))
    return out


def build_all(src: Path) -> dict[str, list[Row]]:
    d: dict[str, list[Row]] = {"sharegpt": sharegpt(src), "leval": leval(src),
                               "lveval": lveval(src), "longbench-v2": longbench_v2(src)}
    d["mixed"] = mixed(d)
    for i, a in enumerate((1.0, 1.2, 1.4)):
        d[f"zipf-{a}"] = zipf(a, seed=100 + i)
    d["mooncake-conversation"] = mooncake(src, "conversation")
    d["mooncake-synthetic"] = mooncake(src, "synthetic")
    d["azure-code"] = azure(src, "code")
    d["azure-conv"] = azure(src, "conv")
    return d


# ----------------------------------------------------------------- stats + README
def pct(xs: list[int], p: float) -> int:
    """Nearest-rank percentile (the value at rank ceil(p/100 * n))."""
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def stats(rows: list[Row]) -> dict:
    ins = [r["input_len"] for r in rows]
    outs = [r["output_len"] for r in rows]
    return {"requests": len(rows), "in_median": pct(ins, 50), "in_p99": pct(ins, 99),
            "in_max": max(ins), "out_median": pct(outs, 50), "out_max": max(outs),
            "duration_s": max(r["arrival_s"] for r in rows)}


INFO = {  # name: (source folder, license, how built, synthesized?)
    "sharegpt": ("sharegpt-loongserve/", "Apache-2.0 (LoongServe repo); ShareGPT itself has no clear license",
                 ("LoongServe's 1,000-request ShareGPT sample (LWM tokenizer), sorted by the authors' "
                 "Poisson arrival times (1 req/s run)."), "no"),
    "leval": ("leval/", "GPL-3.0 (OpenLMLab/LEval repo); documents from many upstream datasets",
              ("Measured L-Eval lengths (Llama-2 tokenizer, LoongServe's recipe: document + instruction "
              "-> reference output). The 272 codeU/narrative_qa rows without documents (input NA) "
              "are skipped, so the 100K+ tail of the paper (max 210.5K) is missing."), "no"),
    "lveval": ("lveval/", "MIT (infinigence/LVEval repo; data carries CC notes)",
               ("**Synthesized** from the composition only: for each (subset, level) row, num_requests "
               "requests with input = round(nominal_words x 1.28 x U(0.75, 1.5)) clipped to "
               "[15,100, 497,300] and output = U{5..60} (the source README's recipe; "
               "`random.Random(1)`), then shuffled (`random.Random(2)`). Every line has "
               "`\"synthetic\": true`."), "**yes**"),
    "longbench-v2": ("longbench-v2/", "MIT (itsnamgyu/longbench2_md, THUDM/LongBench)",
                     (f"input = context_tokens + question_tokens (Llama-2 tokenizer); the 23 rows with NA "
                     f"(contexts of 4 MiB or more, about 1.4M+ tokens) are skipped; output fixed at "
                     f"{LONGBENCH_OUTPUT} tokens (our choice: the answer is a letter or a short CoT)."),
                     "output only"),
    "mixed": ("(sharegpt, leval, lveval above)", "as its sources",
              ("LoongServe's Mixed: for sharegpt, leval, lveval in that order keep prompt >= 16 and "
              "output >= 4, then after `random.seed(0)` draw 1,500 each with `random.sample`, or with "
              "`random.choices` (with replacement) when fewer than 1,500 are eligible: sharegpt has "
              "970 eligible and leval 1,495, so both are sampled **with replacement**; lveval (4,115) "
              "without. Then `random.shuffle`. Lines carry `\"source\"`; lveval rows also "
              "`\"synthetic\": true`."), "1/3 (lveval rows)"),
    "zipf": ("(generated)", "project (Apache-2.0)",
             (f"{ZIPF_N} requests. Binned Zipf: bin k in 1..{ZIPF_BINS} with P(k) ∝ k^-alpha, input "
             f"uniform in ((k-1)*{ZIPF_BIN}, k*{ZIPF_BIN}], so the support is 1..200,000 tokens and "
             f"P(L) ∝ ceil(L/1000)^-alpha; output uniform in {{{ZIPF_OUT[0]}..{ZIPF_OUT[1]}}}. "
             "Seeds `random.Random(100/101/102)`. Why 1K bins: a plain Zipf over 1..200,000 tokens "
              "puts the median at about 14 tokens for alpha 1.2 and 3 for 1.4, no long-context workload."), "**yes**"),
    "mooncake-conversation": ("mooncake-fast25/conversation_trace.jsonl", "Apache-2.0 (kvcache-ai/Mooncake)",
                              ("Real Kimi arrivals: timestamp ms -> s relative to the first; "
                              "input_length/output_length. **First 10 minutes only** (of about 1 h). "
                              "Timestamps are quantized (bursts of equal times)."), "no"),
    "mooncake-synthetic": ("mooncake-fast25/synthetic_trace.jsonl", "Apache-2.0 (kvcache-ai/Mooncake)",
                           ("Mooncake's public-dataset trace with Poisson arrivals: ms -> s relative to "
                           "the first. **First 10 minutes only** (of 1,022 s)."), "no"),
    "azure-code": ("azure-llm-2023/AzureLLMInferenceTrace_code.csv", "CC-BY 4.0 (Azure/AzurePublicDataset; cite Splitwise)",
                   ("Real Azure 2023 arrivals (TIMESTAMP -> s relative to the first row), "
                   "ContextTokens/GeneratedTokens. **First 10 minutes only** (of 57 min)."), "no"),
    "azure-conv": ("azure-llm-2023/AzureLLMInferenceTrace_conv.csv", "CC-BY 4.0 (Azure/AzurePublicDataset; cite Splitwise)",
                   "As azure-code, conversation service. **First 10 minutes only** (of 58 min).", "no"),
}


def readme(data: dict[str, list[Row]]) -> str:
    lines = [
        "# Shipped traces (`esp.traces`)",
        "",
        "Built by `scripts/build_traces.py` from `../shared/traces/` (each source folder has its own",
        "README with commits and column definitions); this file is generated by that script. The build",
        "is deterministic (fixed seeds): rerunning it gives byte-identical files. Only lengths and times",
        "are stored, no text.",
        "",
        "## Schema (DESIGN section 8)",
        "",
        'One request per line: `{"arrival_s": float, "input_len": int, "output_len": int}`.',
        "`arrival_s` is seconds from the first request; it is `0.0` for the length-only sets",
        "(`leval`, `lveval`, `longbench-v2`, `mixed`, `zipf-*`), which the bench pairs with a Poisson",
        "(or gamma) arrival process (`esp-run bench --dataset NAME --num-requests N --rate R`).",
        "Optional extras: `\"synthetic\": true` (synthesized lengths) and `\"source\"` (in `mixed`).",
        "Load with `esp.cli.bench.workload.load_dataset(name)`; `esp.traces.path(name)` gives the file.",
        "",
        "## Statistics (computed by the build script; nearest-rank percentiles, tokens)",
        "",
        ("| dataset | requests | input median | input p99 | input max | output median | output max "
        "| last arrival (s) | synthesized |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in data.items():
        s = stats(rows)
        syn = INFO["zipf" if name.startswith("zipf") else name][3]
        lines.append(f"| `{name}` | {s['requests']} | {s['in_median']} | {s['in_p99']} | {s['in_max']} "
                     f"| {s['out_median']} | {s['out_max']} | {s['duration_s']:.3f} | {syn} |")
    lines += ["", "## Datasets", ""]
    for name in data:
        if name.startswith("zipf-") and name != "zipf-1.0":
            continue
        key = "zipf" if name.startswith("zipf") else name
        src, lic, how, _ = INFO[key]
        title = "zipf-1.0, zipf-1.2, zipf-1.4" if key == "zipf" else name
        lines += [f"### `{title}`", "", f"- Source: `{src}`", f"- License: {lic}", f"- Built: {how}", ""]
    lines += [
        "## Notes",
        "",
        "- Production traces (`mooncake-*`, `azure-*`) are cut to their first 10 minutes to keep this",
        "  folder small (well under 2 MB in total); the full files are in `../shared/traces/`.",
        "- Token counts use the Llama-2/LWM vocabulary, except the production traces (providers' own).",
        "- `lveval` and `zipf-*` are **synthesized** lengths; treat results on them as approximate.",
        "",
    ]
    return "\n".join(lines)


def write(out_dir: Path, data: dict[str, list[Row]]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in data.items():
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows)
        (out_dir / f"{name}.jsonl").write_text(text, encoding="utf-8")
    (out_dir / "README.md").write_text(readme(data), encoding="utf-8")


def build(src: Path = DEFAULT_SRC, out_dir: Path = DEFAULT_OUT) -> dict[str, list[Row]]:
    data = build_all(Path(src))
    write(Path(out_dir), data)
    return data


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    for name, rows in build(a.src, a.out).items():
        print(f"{name:24s} {len(rows):6d}")


if __name__ == "__main__":
    main()
