"""What LoongServe's evaluation runs (SOSP 2024: Fig. 10, 12 and 13): the systems in the paper's
configurations, the datasets with their SLOs and chunk sizes, the figures, and the ratios the
paper reports; `esp.cli.bench.paper` runs them."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

LATENCY_METRICS = ("per_token", "input", "output")
METRIC_LABEL = {"per_token": "per-token capacity", "input": "input capacity", "output": "output capacity",
                "p90": "P90 goodput", "attain": "90% attainment (esp SLO)"}
GOODPUT_TARGET = 0.9
#: metrics that are a share of requests within an SLO, and the share each must keep
SHARE_METRICS = {"p90": GOODPUT_TARGET, "attain": 0.9}
#: loong without decode scale-up (Fig. 13): no instance is ever added to a decode batch, so a
#: request whose holders are full waits, and is recomputed when nothing else can run.
NO_SCALE_UP = {"scale_up": False}


@dataclass(frozen=True)
class System:
    key: str
    label: str
    policy: str
    tp: int
    instances: int
    options: Mapping = field(default_factory=dict)
    chunked: bool = False
    serves_slo: bool = False  # the engine is given the project's SLO as its own (`EngineConfig.slo`)


SYSTEMS = {s.key: s for s in (
    System("loong", "loong 4xTP2", "loong", 2, 4),
    System("vllm-tp8", "vLLM-like 1xTP8", "replicas", 8, 1),
    System("chunked-tp8", "chunked 1xTP8", "chunked", 8, 1, chunked=True),
    System("disagg-tp4", "disagg TP4+TP4", "disagg", 4, 2, {"prefill_instances": 1, "decode_instances": 1}),
    System("static-sp4tp2", "static TP2.SP4", "static-sp", 2, 4),
    System("replicas-tp2x4", "replicas TP2x4", "replicas", 2, 4),
    System("loong-no-scaleup", "loong w/o scale-up", "loong", 2, 4, NO_SCALE_UP),
    System("loong-fcfs", "loong, FCFS order", "loong", 2, 4, {"order": "fcfs"}),
    System("loong-slo", "loong serving the esp SLO", "loong", 2, 4, serves_slo=True),
)}


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    slo_ms: tuple[float, float, float] | None  # per-token, input, output (ms/token); None: P90 goodput only
    chunk: int
    requests: int
    quick_requests: int = 24


DATASETS = {d.name: d for d in (
    DatasetSpec("sharegpt", (92.0, 20.0, 320.0), 256, 500),
    DatasetSpec("leval", (3.5, 1.8, 320.0), 2048, 500),
    DatasetSpec("lveval", (2.5, 2.5, 365.0), 16384, 300),
    DatasetSpec("mixed", (70.0, 90.0, 360.0), 2048, 500),
    DatasetSpec("zipf-1.0", None, 512, 800),
    DatasetSpec("zipf-1.2", None, 512, 800),
    DatasetSpec("zipf-1.4", None, 512, 800),
)}


@dataclass(frozen=True)
class Figure:
    datasets: tuple[str, ...]
    systems: tuple[str, ...]  # the first is the one the others are compared against
    title: str


FIGURES = {
    "fig10": Figure(("sharegpt", "leval", "lveval", "mixed"),
                    ("loong", "vllm-tp8", "chunked-tp8", "disagg-tp4", "static-sp4tp2", "replicas-tp2x4", "loong-fcfs",
                     "loong-slo"),
                    "Fig. 10: end-to-end, loong against vLLM, chunked prefill, disaggregation and static "
                    "TP2 configurations"),
    "fig12": Figure(("zipf-1.0", "zipf-1.2", "zipf-1.4"), ("loong", "vllm-tp8", "static-sp4tp2", "replicas-tp2x4"),
                    "Fig. 12: ablation, ESP against static parallelism on Zipf mixes"),
    "fig13": Figure(("mixed", "lveval"), ("loong", "loong-no-scaleup"),
                    "Fig. 13: ablation of decode scale-up"),
}

#: LoongServe's reported ratios, loong over each baseline: (dataset or "zipf", metric, baseline) -> text
PAPER = {
    ("mixed", "per_token", "vllm-tp8"): "2.66x", ("mixed", "per_token", "chunked-tp8"): "3.85x",
    ("mixed", "per_token", "disagg-tp4"): "OOM",
    ("mixed", "input", "vllm-tp8"): "2.40x", ("mixed", "input", "chunked-tp8"): "3.37x",
    ("leval", "per_token", "vllm-tp8"): "2.11x", ("leval", "per_token", "chunked-tp8"): "1.96x",
    ("leval", "per_token", "disagg-tp4"): "5.81x",
    ("zipf", "p90", "replicas-tp2x4"): "1.75-3.12x", ("zipf", "p90", "static-sp4tp2"): "1.53-3.12x*",
}
PAPER_NOTES = ("*: issue 11's range for TP2.SP4 and TP2 x 4 together; the paper's Zipf ratios are "
               "a range over alpha 1.0, 1.2, 1.4, not per alpha.")


def threshold(dataset: DatasetSpec, metric: str) -> tuple[float, bool]:
    """(threshold, higher_is_better) of a metric on a dataset."""
    if metric in SHARE_METRICS:
        return SHARE_METRICS[metric], True
    return dataset.slo_ms[LATENCY_METRICS.index(metric)] / 1e3, False


def metrics_of(dataset: DatasetSpec) -> tuple[str, ...]:
    return (LATENCY_METRICS if dataset.slo_ms else ()) + tuple(SHARE_METRICS)
