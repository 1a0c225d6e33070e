"""Build the project's shipped traces (``traces/*.jsonl`` and ``traces/README.md``).

Reads the real length/arrival data under ``../shared/traces`` (see its READMEs) and writes
small JSONL files, one request per line: ``{"arrival_s": float, "input_len": int,
"output_len": int}`` (DESIGN section 8), plus ``"synthetic": true`` on rows with synthesized
lengths (all of LV-Eval, L-Eval's 272 rows without documents, and the ``mixed`` and ``zipf-*``
rows drawn from them) and ``"source"`` in ``mixed`` and ``zipf-*``. The ranges match
LoongServe's (ShareGPT 4-2.3K, L-Eval 2.7K-210.5K, LV-Eval 15.1K-497.3K, Zipf 10-200K). Only
lengths and times are kept, never text.

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
from statistics import NormalDist

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SRC = REPO.parent / "shared" / "traces"
DEFAULT_OUT = REPO / "traces"

WINDOW_S = 600.0  # production traces: keep the first 10 minutes
LONGBENCH_OUTPUT = 128  # LongBench v2 output length (a short CoT + letter)
ZIPF_N, ZIPF_RANGE, ZIPF_ALPHAS = 2000, (10, 200_000), (1.0, 1.2, 1.4)  # LoongServe: 20,000 requests
# L-Eval's 272 rows without documents: narrative_qa = 20 documents of 32,805 words on average
# (OpenLMLab/LEval README) at 1.5 tokens per word (the same README's rule of thumb), the
# longest request LEVAL_MAX (LoongServe's 210.5K); codeU = 90 codebases of LEVAL_CODEU tokens
# (uniform; LongCodeU, arXiv 2503.04359, gives L-Eval's longest code input as 36.5K).
LEVAL_NARRATIVE, LEVAL_MAX, LEVAL_CODEU = (20, 32_805, 1.5), 210_500, (26_500, 36_500)
# LV-Eval: 11,896 / 102,380 / 387,406 words (min / mean / max, LV-Eval README) over the
# nominal levels (16K / 99.2K mean / 256K): a triangular factor with that min, mean and max
LVEVAL_FACTOR = (11_896 / 16_000, 3 * 102_380 / 99_200 - 11_896 / 16_000 - 387_406 / 256_000, 387_406 / 256_000)
LVEVAL_TOKENS_PER_WORD, LVEVAL_RANGE = 1.28, (15_100, 497_300)
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


def _lognormal_sizes(n: int, mean: float, top: float) -> list[float]:
    """n deterministic lognormal sizes (the quantiles at (i + 0.5) / n) whose mean is `mean`
    and whose largest is `top`: sigma solved by bisection on top / mean."""
    zs = [NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)]

    def ratio(sigma: float) -> float:
        return math.exp(sigma * zs[-1]) / (sum(math.exp(sigma * z) for z in zs) / n)

    lo, hi = 0.0, 5.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ratio(mid) < top / mean else (lo, mid)
    sigma = (lo + hi) / 2
    scale = top / math.exp(sigma * zs[-1])
    return [scale * math.exp(sigma * z) for z in zs]


def leval(src: Path) -> list[Row]:
    """Measured rows as they are; the 272 rows without documents (``NA``: narrative_qa, codeU)
    keep their measured instruction and output lengths and get a **synthesized** document
    length (``"synthetic": true``), see ``LEVAL_NARRATIVE`` and ``LEVAL_CODEU``."""
    rows = _csv(src / "leval" / "leval_lengths_llama2.csv")
    out: list[Row] = []
    narrative = [r for r in rows if r["task"] == "narrative_qa" and r["input_len"] == "NA"]
    codeu = [r for r in rows if r["task"] == "codeU" and r["input_len"] == "NA"]
    # narrative_qa: 20 documents, instructions split over them in file order; the longest
    # document makes the longest request exactly LEVAL_MAX (the paper's 210.5K)
    ndocs, mean_words, tokens_per_word = LEVAL_NARRATIVE
    bounds = [round(i * len(narrative) / ndocs) for i in range(ndocs + 1)]
    groups = [narrative[a:b] for a, b in zip(bounds, bounds[1:])]
    order = list(range(ndocs))
    random.Random(3).shuffle(order)  # which document gets which size
    longest = order.index(ndocs - 1)
    top = LEVAL_MAX - max(int(r["instr_tokens"]) for r in groups[longest])
    sizes = _lognormal_sizes(ndocs, mean_words * tokens_per_word, top)
    doc_of: dict[int, int] = {}
    for g, members in enumerate(groups):
        for r in members:
            doc_of[id(r)] = round(sizes[order[g]])
    lo, hi = LEVAL_CODEU
    rng = random.Random(4)
    for r in codeu:
        doc_of[id(r)] = round(rng.uniform(lo, hi))
    for r in rows:
        if r["input_len"] != "NA":
            out.append(_req(0.0, int(r["input_len"]), int(r["output_len"])))
        elif id(r) in doc_of:
            out.append(_req(0.0, doc_of[id(r)] + int(r["instr_tokens"]), int(r["output_len"]), synthetic=True))
    return out


def lveval(src: Path) -> list[Row]:
    """Synthesized: input = nominal_words x factor x 1.28 tokens/word, factor ~ triangular on
    [LVEVAL_FACTOR] (LV-Eval's published min, mean and max words over nominal), clipped to
    [15.1K, 497.3K]; output = U{5..60}; num_requests per (subset, level) row; then shuffled."""
    low, mode, high = LVEVAL_FACTOR
    rng = random.Random(1)
    out: list[Row] = []
    for r in _csv(src / "lveval" / "lveval_en_composition.csv"):
        words = int(r["nominal_words"])
        for _ in range(int(r["num_requests"])):
            inp = round(words * LVEVAL_TOKENS_PER_WORD * rng.triangular(low, high, mode))
            out.append(_req(0.0, min(max(inp, LVEVAL_RANGE[0]), LVEVAL_RANGE[1]), rng.randint(5, 60),
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
        out += [_req(0.0, r["input_len"], r["output_len"], source=name,
                     **({"synthetic": True} if r.get("synthetic") else {})) for r in pick]
    rng.shuffle(out)
    return out


def zipf(alpha: float, pool: list[Row], n: int = ZIPF_N) -> list[Row]:
    """LoongServe's Zipf mix (`4-mix-dataset-zipf.py`): after `random.seed(0)`, n target
    lengths from `random.choices(range(10, 200000), weights=1/x**alpha)`; each becomes a
    `random.choice` among the pooled ShareGPT, L-Eval and LV-Eval requests of the nearest
    available prompt length (ties to the shorter). Rows keep `"source"`, and `"synthetic"`
    when the picked request is."""
    rng = random.Random(0)
    by_len: dict[int, list[Row]] = {}
    for r in pool:
        by_len.setdefault(r["input_len"], []).append(r)
    avail = sorted(by_len)
    lens = range(ZIPF_RANGE[0], ZIPF_RANGE[1])
    targets = rng.choices(lens, weights=[1 / x ** alpha for x in lens], k=n)
    out = []
    for t in targets:
        i = bisect.bisect_left(avail, t)
        near = [avail[j] for j in (i - 1, i) if 0 <= j < len(avail)]
        length = min(near, key=lambda x: (abs(x - t), x))
        r = rng.choice(by_len[length])
        extra = {"source": r["source"]} | ({"synthetic": True} if r.get("synthetic") else {})
        out.append(_req(0.0, r["input_len"], r["output_len"], **extra))
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
    pool = [r | {"source": name} for name in ("sharegpt", "leval", "lveval") for r in d[name]]
    for a in ZIPF_ALPHAS:
        d[f"zipf-{a}"] = zipf(a, pool)
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
              "-> reference output) for the 2,074 rows with documents. The 272 rows whose documents are "
              "not in the source (codeU 90, narrative_qa 182: input NA) keep their measured instruction "
              "and output lengths and get a **synthesized** document length, marked `\"synthetic\": true`: "
              f"narrative_qa's 182 instructions are split in file order over {LEVAL_NARRATIVE[0]} documents "
              f"whose sizes are the lognormal quantiles with mean {LEVAL_NARRATIVE[1]:,} words x "
              f"{LEVAL_NARRATIVE[2]} tokens/word (the OpenLMLab/LEval README's average and rule of thumb) "
              f"and whose longest request is {LEVAL_MAX:,} tokens (the paper's 210.5K), assigned to "
              "documents by `random.Random(3)`; each codeU request gets a document of "
              f"U({LEVAL_CODEU[0]:,}, {LEVAL_CODEU[1]:,}) tokens (`random.Random(4)`; LongCodeU, "
              "arXiv 2503.04359, gives L-Eval's longest code input as 36.5K). Range 2,749-210,500 "
              "(the paper: 2.7K-210.5K)."), "272 rows (narrative_qa, codeU documents)"),
    "lveval": ("lveval/", "MIT (infinigence/LVEval repo; data carries CC notes)",
               ("**Synthesized** from the composition only: for each (subset, level) row, num_requests "
               f"requests with input = round(nominal_words x {LVEVAL_TOKENS_PER_WORD} x f) clipped to "
               f"[{LVEVAL_RANGE[0]:,}, {LVEVAL_RANGE[1]:,}] (the paper's 15.1K-497.3K), f ~ triangular("
               f"{LVEVAL_FACTOR[0]:.4f}, mode {LVEVAL_FACTOR[1]:.4f}, {LVEVAL_FACTOR[2]:.4f}): the min, mean "
               "and max of f are LV-Eval's published 11,896 / 102,380 / 387,406 words over the nominal "
               "16K / 99.2K (mean level) / 256K words (LV-Eval README); output = U{5..60} "
               "(`random.Random(1)`), then shuffled (`random.Random(2)`). Every line has "
               "`\"synthetic\": true`."), "**yes**"),
    "longbench-v2": ("longbench-v2/", "MIT (itsnamgyu/longbench2_md, THUDM/LongBench)",
                     (f"input = context_tokens + question_tokens (Llama-2 tokenizer); the 23 rows with NA "
                     f"(contexts of 4 MiB or more, about 1.4M+ tokens) are skipped; output fixed at "
                     f"{LONGBENCH_OUTPUT} tokens (our choice: the answer is a letter or a short CoT)."),
                     "output only"),
    "mixed": ("(sharegpt, leval, lveval above)", "as its sources",
              ("LoongServe's Mixed: for sharegpt, leval, lveval in that order keep prompt >= 16 and "
              "output >= 4, then after `random.seed(0)` draw 1,500 each with `random.sample`, or with "
              "`random.choices` (with replacement) when fewer than 1,500 are eligible (sharegpt has "
              "970 eligible, so it is sampled **with replacement**). Then `random.shuffle`. Lines carry "
              "`\"source\"`; rows drawn from synthesized lengths also `\"synthetic\": true`."),
              "lveval rows and synthesized leval rows"),
    "zipf": ("(sharegpt, leval, lveval above)", "as its sources",
             (f"{ZIPF_N:,} requests (LoongServe used 20,000), LoongServe's `4-mix-dataset-zipf.py` recipe: "
             "after `random.seed(0)`, target prompt lengths from `random.choices(range(10, 200000), "
             "weights=1/x**alpha)`; each target becomes a `random.choice` among the pooled sharegpt, "
             "leval and lveval requests of the nearest available prompt length (ties to the shorter), "
             "keeping that request's output length. Lines carry `\"source\"`, and `\"synthetic\": "
             "true` when the picked request is synthesized."), "picked synthesized rows"),
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
        marked = sum(1 for r in rows if r.get("synthetic"))
        if 0 < marked < len(rows):
            syn = f"{marked} rows"
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
        "- `lveval` and 272 `leval` rows are **synthesized** lengths, and so are the `mixed` and `zipf-*`",
        "  rows drawn from them (each marked `\"synthetic\": true`); treat results on them as approximate.",
        "- Ranges against LoongServe's (tokens): sharegpt 6-2,238 (4-2.3K), leval 2,749-210,500",
        "  (2.7K-210.5K), lveval 15.1K-497.3K by construction, zipf-* 10-200K.",
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
