"""Prometheus metrics of one server (its own registry, so two apps in one process do not clash)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # *_created series double the output and no dashboard uses them

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class ServerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("kubetune_requests", "HTTP requests to the API by endpoint and status.",
                                ["endpoint", "status"], registry=r)
        self.waiting = Gauge("kubetune_requests_waiting", "Requests admitted and waiting for the engine (queue length).",
                             registry=r)
        self.running = Gauge("kubetune_requests_running", "Requests being generated now.", registry=r)
        self.prompt_tokens = Counter("kubetune_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.generation_tokens = Counter("kubetune_generation_tokens", "Tokens generated.", ["model"], registry=r)
        self.latency = Histogram("kubetune_request_latency_seconds", "Time from admission to the last token.",
                                 ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("kubetune_time_to_first_token_seconds", "Time from admission to the first token.",
                                     ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("kubetune_requests_rejected", "Requests refused with 429 because the queue was full.",
                                registry=r)
