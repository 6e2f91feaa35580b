"""The server's Prometheus series and the ASGI middleware that counts and times every answer."""
from __future__ import annotations

import json
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets (seconds): a tiny CPU model answers in ~0.1 s, a 7B GPU batch in tens.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKENS_PER_SECOND_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)


class Metrics:
    """The Prometheus series of one server, in a registry of its own."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("medqlora_requests", "HTTP requests, by endpoint and status "
                                "code (499: the client left before the answer's last byte)",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("medqlora_request_errors", "Requests answered with an error "
                              "(status >= 400, 499 excepted), by endpoint and OpenAI error type",
                              ["endpoint", "type"], registry=r)
        self.latency = Histogram("medqlora_request_latency_seconds", "Time from request to the "
                                 "last byte of the answer (streams included)", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("medqlora_time_to_first_token_seconds", "Time from a generation "
                              "request's arrival to its first generated token (queue included)",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tokens_per_second = Histogram(
            "medqlora_generation_tokens_per_second", "Generated tokens per second of each "
            "request, from its first to its last token", buckets=TOKENS_PER_SECOND_BUCKETS,
            registry=r)
        self.generated = Counter("medqlora_generated_tokens", "Tokens generated (answers, eos "
                                 "excluded)", registry=r)
        self.prompt_tokens = Counter("medqlora_prompt_tokens", "Prompt tokens of generation "
                                     "requests", registry=r)
        self.queue_depth = Gauge("medqlora_queue_depth", "Generation requests waiting for a "
                                 "free row of the running batch", registry=r)
        self.batch_size = Histogram("medqlora_batch_size", "Requests decoded together, per "
                                    "decode step (continuous batching)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# The status recorded for a request whose client went away before its answer's last byte
# (an abandoned stream, an upload cut short): nginx's "client closed request". Such requests are
# counted and timed, but are not errors the server answered.
CLIENT_CLOSED = 499


class MetricsMiddleware:
    """ASGI middleware: count every request by status, and time it to its last body byte
    (so a stream's latency is the whole stream, not its first chunk). A request that ends
    without a last byte (starlette cancels a stream whose client disconnected) is counted
    as CLIENT_CLOSED when the app returns."""

    ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in self.ENDPOINTS else "other"
        start, status = time.perf_counter(), {"code": 500, "recorded": False}
        body = bytearray()

        def record(code: int) -> None:
            if not status["recorded"]:
                status["recorded"] = True
                self._record(endpoint, code, time.perf_counter() - start, body)

        async def observe(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "http.response.body":
                if status["code"] >= 400 and len(body) < 4096:
                    body.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    record(status["code"])
            await send(message)

        try:
            await self.app(scope, receive, observe)
        except Exception:
            record(500)
            raise
        finally:
            record(CLIENT_CLOSED)    # returned, or cancelled, without a last byte

    def _record(self, endpoint: str, code: int, seconds: float, body: bytes) -> None:
        self.metrics.requests.labels(endpoint, str(code)).inc()
        if endpoint != "/metrics":
            self.metrics.latency.labels(endpoint).observe(seconds)
        if code >= 400 and code != CLIENT_CLOSED:
            try:
                type_ = json.loads(bytes(body))["error"]["type"]
            except (ValueError, KeyError, TypeError):
                type_ = "server_error" if code >= 500 else "invalid_request_error"
            self.metrics.errors.labels(endpoint, str(type_)).inc()
