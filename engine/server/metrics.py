"""Prometheus series of one app, in its own registry (several apps may share a process).

Names follow vLLM's where one exists, with the `esp_` prefix. What a finished request tells
(latencies, tokens, how ESP ran it) is recorded by the handlers; what the engine knows now
(queue, KV use, restarts) is read from `engine.stats()` at scrape time.
"""
from __future__ import annotations

import bisect
import itertools
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from esp.engine.outputs import RequestOutput
from esp.engine.status import SCHEDULE_BUCKETS

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40,
                80, 160, 320, 640, 1280, 2560, 3600)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10,
               20, 40, 80)
REQUEST_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920,
                   3600)
DOP_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
PROMPT_BUCKETS = ((1024, "<1K"), (8192, "1K-8K"), (32768, "8K-32K"), (131072, "32K-128K"))
PROMPT_BUCKET_TOP = ">=128K"

_GAUGES = (
    ("esp_num_requests_running", "Requests holding KV in the engine", "running"),
    ("esp_num_requests_waiting", "Requests waiting for their prefill", "waiting"),
    ("esp_num_waiting_tokens", "Prompt tokens of the waiting requests", "waiting_tokens"),
)
_COUNTERS = (
    ("esp_worker_restarts", "Times the worker group was restarted after a failure", "restarts"),
    ("esp_recomputed_requests", "Requests recomputed from their tokens after a restart", "recomputed_requests"),
    ("esp_engine_rejected_overloaded", "Requests the engine refused with a full queue (all callers)",
     "rejected_overloaded"),
    ("esp_scheduler_seconds", "Seconds spent planning steps", "schedule_seconds_total"),
)
_PER_INSTANCE = (
    ("esp_kv_cache_usage_perc", "Fraction of the instance's KV slots in use (0 to 1)",
     lambda cap, free: 1 - free / cap if cap else 0.0),
    ("esp_kv_free_slots", "Free KV slots (tokens) of the instance", lambda cap, free: free),
    ("esp_kv_capacity_slots", "KV slots (tokens) of the instance", lambda cap, free: cap),
)


def prompt_bucket(tokens: int) -> str:
    i = bisect.bisect_right([limit for limit, _ in PROMPT_BUCKETS], tokens)
    return PROMPT_BUCKETS[i][1] if i < len(PROMPT_BUCKETS) else PROMPT_BUCKET_TOP


class EngineCollector:
    """`engine.stats()` as metric families, read on every scrape (nothing while not started)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def describe(self) -> Iterator[Metric]:
        return self._families(None)

    def collect(self) -> Iterator[Metric]:
        return self._families(self.engine.stats() if self.engine.started else None)

    @staticmethod
    def _families(stats) -> Iterator[Metric]:
        for name, doc, attr in _GAUGES:
            yield GaugeMetricFamily(name, doc, value=None if stats is None else getattr(stats, attr))
        for name, doc, attr in _COUNTERS:
            yield CounterMetricFamily(name, doc, value=None if stats is None else getattr(stats, attr))
        for name, doc, value in _PER_INSTANCE:
            family = GaugeMetricFamily(name, doc, labels=["instance"])
            if stats is not None:
                for rank, (cap, free) in enumerate(zip(stats.kv_capacity, stats.kv_free)):
                    family.add_metric([str(rank)], value(cap, free))
            yield family
        hist = HistogramMetricFamily("esp_schedule_duration_seconds", "Wall time of each scheduler call")
        if stats is not None:
            counts = list(itertools.accumulate(stats.schedule_buckets))
            hist.add_metric([], [(str(le), n) for le, n in zip(SCHEDULE_BUCKETS, counts)] + [("+Inf", counts[-1])],
                            stats.schedule_seconds_total)
        yield hist


class Metrics:
    def __init__(self, engine) -> None:
        self.registry = r = CollectorRegistry()
        r.register(EngineCollector(engine))
        self.success = Counter("esp_request_success", "Finished requests by finish reason (abort includes "
                               "clients that went away)", ["finished_reason"], registry=r)
        self.rejected = Counter("esp_request_rejected", "Requests refused by the server, by reason",
                                ["reason"], registry=r)
        self.prompt_tokens = Counter("esp_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("esp_generation_tokens", "Generated tokens of finished requests",
                                         registry=r)
        self.ttft = Histogram("esp_time_to_first_token_seconds", "Arrival to first token", registry=r,
                              buckets=TTFT_BUCKETS)
        self.ttft_by_prompt = Histogram("esp_time_to_first_token_by_prompt_seconds",
                                        "Arrival to first token, by prompt length", ["prompt_bucket"],
                                        registry=r, buckets=TTFT_BUCKETS)
        self.itl = Histogram("esp_inter_token_latency_seconds", "Mean time per output token after the first",
                             registry=r, buckets=ITL_BUCKETS)
        self.e2e = Histogram("esp_e2e_request_latency_seconds", "Arrival to finish", registry=r,
                             buckets=REQUEST_BUCKETS)
        self.queue = Histogram("esp_request_queue_time_seconds", "Arrival to first prefill", registry=r,
                               buckets=REQUEST_BUCKETS)
        self.dop = Histogram("esp_prefill_dop", "Instances that prefilled a request (its degree of parallelism)",
                             registry=r, buckets=DOP_BUCKETS)
        self.scale_up = Counter("esp_scale_up", "Decode scale-ups (a request's KV grew onto another instance)",
                                registry=r)
        self.scale_down = Counter("esp_scale_down", "Prefills whose KV was kept on fewer instances than ran them",
                                  registry=r)
        self.migrations = Counter("esp_migrations", "KV migrations between instances", registry=r)
        self.preemptions = Counter("esp_num_preemptions", "Preemptions of finished requests", registry=r)
        self.slo = Counter("esp_slo_requests", "Finished requests with a latency target (their own or the "
                           "service's), by target (ttft, tpot) and whether they met it", ["target", "met"], registry=r)

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def finished(self, out: RequestOutput | None) -> None:
        """Record a request's end from its last output; an unfinished one was aborted (its
        client went away)."""
        if out is None or not out.finished:
            self.success.labels("abort").inc()
            if out is not None:
                self.generation_tokens.inc(out.completion_tokens)
            return
        self.success.labels(out.finish_reason).inc()
        self.prompt_tokens.inc(out.prompt_tokens)
        self.generation_tokens.inc(out.completion_tokens)
        self._latencies(out)
        self._esp(out.esp)

    def _latencies(self, out: RequestOutput) -> None:
        t = out.timing
        if t is None:
            return
        for hist, value in ((self.ttft, t.ttft_s), (self.itl, t.tpot_s), (self.e2e, t.e2e_s),
                            (self.queue, t.queue_s)):
            if value is not None:
                hist.observe(value)
        if t.ttft_s is not None:
            self.ttft_by_prompt.labels(prompt_bucket(out.prompt_tokens)).observe(t.ttft_s)

    def _esp(self, esp: dict) -> None:
        group = esp.get("prefill_group")
        if group:
            self.dop.observe(len(group))
            kept = sum(1 for n in (esp.get("keep_plan") or {}).values() if n > 0)
            if 0 < kept < len(group):
                self.scale_down.inc()
        kinds = [e.get("kind") for e in esp.get("scale_events") or ()]
        self.scale_up.inc(kinds.count("scale_up"))
        self.migrations.inc(kinds.count("migrate"))
        self.preemptions.inc(esp.get("preemptions") or 0)
        slo = esp.get("slo") or {}
        for target in ("ttft", "tpot"):
            met = slo.get(f"{target}_met")
            if met is not None:
                self.slo.labels(target, str(met).lower()).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
