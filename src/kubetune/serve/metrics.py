"""Prometheus metrics of one server (its own registry, so two apps in one process do not clash).

Each measure is published under kubetune's name and, for those vLLM also has, under vLLM's name
(`vllm:num_requests_waiting`, ...): `kubetune deploy`'s HPA and the dashboards people already have
for vLLM read one set of names whichever engine serves."""

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
        self._vllm = {
            "waiting": Gauge("vllm:num_requests_waiting", "Requests waiting to be processed (kubetune: admitted, "
                             "not yet generating).", registry=r),
            "running": Gauge("vllm:num_requests_running", "Requests in the running batch.", registry=r),
            "prompt_tokens": Counter("vllm:prompt_tokens", "Prompt tokens processed.", ["model_name"], registry=r),
            "generation_tokens": Counter("vllm:generation_tokens", "Tokens generated.", ["model_name"], registry=r),
            "latency": Histogram("vllm:e2e_request_latency_seconds", "Request latency.", ["model_name"],
                                 buckets=_LATENCY_BUCKETS, registry=r),
            "first_token": Histogram("vllm:time_to_first_token_seconds", "Time to the first token.", ["model_name"],
                                     buckets=_LATENCY_BUCKETS, registry=r),
        }
        self.rejected = Counter("kubetune_requests_rejected", "Requests refused with 429 because the queue was full.",
                                registry=r)

    def queue(self, running: int, waiting: int) -> None:
        for gauge, value in ((self.running, running), (self.waiting, waiting), (self._vllm["running"], running),
                             (self._vllm["waiting"], waiting)):
            gauge.set(value)

    def first_token_after(self, model: str, seconds: float) -> None:
        self.first_token.labels(model).observe(seconds)
        self._vllm["first_token"].labels(model).observe(seconds)

    def finished(self, model: str, prompt_tokens: int, generated: int, seconds: float) -> None:
        self.tokens(model, prompt_tokens, generated)
        self.latency.labels(model).observe(seconds)
        self._vllm["latency"].labels(model).observe(seconds)

    def tokens(self, model: str, prompt_tokens: int, generated: int) -> None:
        """Work done, also for a request whose client went away: vLLM counts tokens at each step, so an
        HPA on the generation rate sees abandoned work too."""
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(generated)
        self._vllm["prompt_tokens"].labels(model).inc(prompt_tokens)
        self._vllm["generation_tokens"].labels(model).inc(generated)
