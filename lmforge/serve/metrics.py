"""GET /metrics: Prometheus text format with vLLM's metric names under the `lmforge:` prefix.

Engine state (running, waiting, KV blocks, prefix-cache and token counters) is read from `engine.stats()`
when scraped; latencies (time to first token, inter-token latency, end-to-end) are measured by the server
as the events of each request arrive. Each app has its own registry, so several servers in one process
(the tests) do not share counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# vLLM's buckets (vllm/engine/metrics.py), seconds
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _EngineCollector(Collector):
    """Gauges and counters from engine.stats(), read at scrape time (None while the model loads)."""

    def __init__(self, stats: Callable[[], dict[str, Any] | None], model_name: Callable[[], str]) -> None:
        self.stats = stats
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        if s is None:
            return
        name = [self.model_name()]

        def gauge(metric: str, help: str, value: float) -> Metric:
            g = GaugeMetricFamily(f"lmforge:{metric}", help, labels=["model_name"])
            g.add_metric(name, value)
            return g

        def counter(metric: str, help: str, value: float) -> Metric:
            c = CounterMetricFamily(f"lmforge:{metric}", help, labels=["model_name"])
            c.add_metric(name, value)
            return c

        total, used = s.get("kv_blocks_total", 0), s.get("kv_blocks_used", 0)
        yield gauge("num_requests_running", "Requests being decoded.", s.get("running", 0))
        yield gauge("num_requests_waiting", "Requests queued for a slot.", s.get("waiting", 0))
        yield gauge(
            "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", used / total if total else 0.0
        )
        yield gauge("kv_cache_blocks_used", "KV-cache blocks in use.", used)
        yield gauge("kv_cache_blocks_total", "KV-cache blocks in all.", total)
        yield counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.get("prefix_cache_queries", 0)
        )
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.get("prefix_cache_hits", 0))
        yield counter("num_preemptions", "Requests preempted to free KV blocks.", s.get("preemptions", 0))
        yield counter("prompt_tokens", "Prompt tokens processed.", s.get("prompt_tokens", 0))
        yield counter("generation_tokens", "Tokens generated.", s.get("generated_tokens", 0))


class ServerMetrics:
    """The registry behind /metrics: the engine's state plus the latencies the server measures."""

    def __init__(self, stats: Callable[[], dict[str, Any] | None], model_name: Callable[[], str]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats, model_name))
        self.ttft = Histogram(
            "lmforge:time_to_first_token_seconds",
            "Time from the request's arrival to its first token.",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "lmforge:inter_token_latency_seconds",
            "Time between two tokens of one request.",
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "lmforge:e2e_request_latency_seconds",
            "Time from a request's arrival to its last token.",
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )
        self.finished = Counter(
            "lmforge:request_success",
            "Requests finished, by finish reason.",
            ["finished_reason"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "lmforge:request_rejected",
            "Requests answered with an error, by HTTP status.",
            ["status"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
