"""`medqlora serve`: a verified package over the OpenAI HTTP API, with Prometheus metrics.

    medqlora serve artifacts/package --port 8000                 # a package folder
    medqlora serve --repo https://git.example.org/team/medqlora --rev v1.0.0 \
        --artifact medqlora-tiny-med                             # dvc artifacts get, verify, serve
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"model": "medqlora-tiny-med", "messages": [{"role": "user", "content": "What is anaemia?"}]}'

Endpoints: GET /v1/models, POST /v1/chat/completions (stream or not), POST /v1/completions,
GET /health, GET /metrics (Prometheus text). FastAPI on uvicorn; imported at the top, so the
project image's build (which imports every medqlora module) fails if its lock lacks them.

One generation path. The model is loaded by generation.load_for_generation (as `medqlora
generate` loads it), chat prompts are built by templates.format_messages (the template and
system text of training), and every batch is decoded with generation.generation_config and
generation.left_pad, the settings and padding evaluate and `medqlora generate` use; an answer is
the new tokens up to eos, decoded without special tokens and stripped, as generation does. So
greedy answers equal `medqlora generate`'s (tests/test_serving.py checks it).

Batching. Requests are tokenised on the event loop and queued; one worker thread owns the
model. It takes the oldest request, waits up to --batch-wait-ms for others with the same
sampling settings (at most --max-batch-size), and runs them as one left-padded model.generate.
Tokens reach each request through a streamer as they are decoded, so streaming and time to
first token are real; a request whose answer ended (eos, its max_tokens, a stop string, or a
client that went away) stops costing compute at the next step. This is dynamic batching, not
vLLM's continuous batching: a request that arrives during a batch waits for the next one.
"""
from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import StoppingCriteria

from medqlora import generation
from medqlora.outputs import read_json

log = logging.getLogger(__name__)
# Latency buckets (seconds): a tiny CPU model answers in ~0.1 s, a 7B GPU batch in tens.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKENS_PER_SECOND_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)


# ---------------------------------------------------------------- errors

class APIError(Exception):
    """An error answered with OpenAI's body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# ---------------------------------------------------------------- metrics

class Metrics:
    """The Prometheus series of one server, in a registry of its own."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("medqlora_requests", "HTTP requests answered, by endpoint and "
                                "status code", ["endpoint", "status"], registry=r)
        self.errors = Counter("medqlora_request_errors", "Requests answered with an error "
                              "(status >= 400), by endpoint and OpenAI error type",
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
                                 "batch", registry=r)
        self.batch_size = Histogram("medqlora_batch_size", "Requests per model.generate batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# ---------------------------------------------------------------- the model

@dataclass(frozen=True)
class Defaults:
    """The package's generation settings (meta.json "generation"), used where a request is silent."""
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    seed: int

    @classmethod
    def from_package(cls, package_dir: Path) -> "Defaults":
        recorded = read_json(package_dir / "meta.json").get("params", {}).get("generation", {})
        return cls(int(recorded.get("max_new_tokens", 64)), bool(recorded.get("do_sample", False)),
                   float(recorded.get("temperature", 1.0)), float(recorded.get("top_p", 1.0)),
                   int(recorded.get("seed", 0)))


@dataclass
class Loaded:
    """What the server holds: model, tokenizer, the training prompt's system text, settings."""
    model: Any
    tokenizer: Any
    name: str
    system: str
    defaults: Defaults
    max_positions: int | None


def load_package(package_dir: str | Path, merged: bool = False,
                 name: str | None = None) -> Loaded:
    """The package's model as `medqlora generate` loads it (call verify first)."""
    from medqlora.generation import load_for_generation
    package_dir = Path(package_dir)
    meta = read_json(package_dir / "meta.json")
    model, tokenizer = load_for_generation(package_dir, merged)
    config = getattr(model, "config", None)
    return Loaded(model=model, tokenizer=tokenizer,
                  name=name or meta.get("params", {}).get("package", {}).get("name")
                  or package_dir.name,
                  system=meta.get("prompt", {}).get("system", ""),
                  defaults=Defaults.from_package(package_dir),
                  max_positions=getattr(config, "max_position_embeddings", None))


# ---------------------------------------------------------------- jobs and the batching engine

@dataclass
class Job:
    """One generation request on its way through the engine."""
    prompt_ids: list[int]
    max_tokens: int
    sampling: tuple[bool, float, float, int]   # do_sample, temperature, top_p, seed
    stop: tuple[str, ...]
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    created: float = field(default_factory=time.perf_counter)
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    text: str = ""
    finish: str | None = None
    first_token_at: float | None = None
    cancelled: bool = False
    done: bool = False

    def emit(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    """A worker thread that batches queued jobs through model.generate."""

    def __init__(self, loaded: Loaded, metrics: Metrics, max_batch_size: int = 8,
                 batch_wait_ms: float = 10.0, max_queue: int = 256):
        self.loaded, self.metrics = loaded, metrics
        self.max_batch_size, self.batch_wait = max_batch_size, batch_wait_ms / 1000.0
        self.max_queue = max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._pending: deque[Job] = deque()   # taken from the queue, other sampling settings
        self._waiting = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="medqlora-engine", daemon=True)
        self.device = next(loaded.model.parameters()).device

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._waiting >= self.max_queue:
                raise APIError(503, f"the server has {self._waiting} requests waiting "
                               f"(--max-queue {self.max_queue}); retry later",
                               "server_overloaded", code="server_overloaded")
            self._waiting += 1
            self.metrics.queue_depth.set(self._waiting)
        self._queue.put(job)

    def _taken(self, count: int) -> None:
        with self._lock:
            self._waiting -= count
            self.metrics.queue_depth.set(self._waiting)

    def _next_batch(self) -> list[Job] | None:
        """The oldest job, plus those with the same sampling settings that arrive in time."""
        first = self._pending.popleft() if self._pending else self._queue.get()
        if first is None:
            return None
        batch = [first]
        for job in list(self._pending):
            if len(batch) < self.max_batch_size and job.sampling == first.sampling:
                self._pending.remove(job)
                batch.append(job)
        deadline = time.monotonic() + self.batch_wait
        while len(batch) < self.max_batch_size:
            try:
                job = self._queue.get(timeout=max(deadline - time.monotonic(), 1e-4))
            except queue.Empty:
                break
            if job is None:          # shutting down: finish this batch first
                self._queue.put(None)
                break
            (batch if job.sampling == first.sampling else self._pending).append(job)
        self._taken(len(batch))
        return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._generate(batch)
            except Exception as err:  # noqa: BLE001 - one failed batch must not stop the server
                log.exception("generation failed for a batch of %d", len(batch))
                for job in batch:
                    job.emit(("error", f"generation failed: {type(err).__name__}: {err}"))

    def _generate(self, batch: list[Job]) -> None:
        """One model.generate over the batch, with evaluate's GenerationConfig and padding."""
        from transformers import StoppingCriteriaList, set_seed
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        do_sample, temperature, top_p, seed = batch[0].sampling
        settings = generation.GenerationSettings(
            max_new_tokens=max(job.max_tokens for job in batch), do_sample=do_sample,
            temperature=temperature, top_p=top_p, batch_size=len(batch), seed=seed)
        ids, mask = generation.left_pad([job.prompt_ids for job in batch], tokenizer.pad_token_id)
        self.metrics.batch_size.observe(len(batch))
        set_seed(seed)
        with torch.no_grad():
            model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                           generation_config=generation.generation_config(settings, tokenizer),
                           streamer=_Streamer(self, batch),
                           stopping_criteria=StoppingCriteriaList([_Done(batch)]))
        for job in batch:   # rows that ran to the batch's max_new_tokens
            self._finish(job, "length")

    def step(self, batch: list[Job], tokens: list[int]) -> None:
        """One decoding step: a new token per row (finished rows get padding, ignored)."""
        now = time.perf_counter()
        eos = self.loaded.tokenizer.eos_token_id
        for job, token in zip(batch, tokens):
            if job.done or job.cancelled:
                continue
            if job.first_token_at is None:
                job.first_token_at = now
                self.metrics.ttft.observe(now - job.created)
            if token == eos:
                self._finish(job, "stop")
                continue
            job.tokens.append(token)
            text = self.loaded.tokenizer.decode(job.tokens, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, job.finish = text[:cut], "stop"
            elif len(job.tokens) >= job.max_tokens:
                job.finish = "length"
            job.text = text
            if job.finish is not None:
                self._finish(job, job.finish)
            elif job.stream:
                self._stream(job, text[:len(text) - _stop_prefix(text, job.stop)], final=False)

    def _stream(self, job: Job, visible: str, final: bool) -> None:
        """Send the text not yet sent; hold back a trailing partial UTF-8 character and trailing
        whitespace (the final answer is stripped), so the deltas add up to the answer."""
        visible = visible.strip()
        if not final and visible.endswith("\ufffd"):
            return
        if visible.startswith(job.sent) and len(visible) > len(job.sent):
            job.emit(("delta", visible[len(job.sent):]))
            job.sent = visible

    def _finish(self, job: Job, reason: str) -> None:
        """Answer a job as soon as its row ends (the batch may run on for longer rows)."""
        if job.done or job.cancelled:
            return
        job.finish, job.done = reason, True
        answer = job.text.strip()
        if job.stream:
            self._stream(job, answer, final=True)
        elapsed = time.perf_counter() - (job.first_token_at or job.created)
        self.metrics.generated.inc(len(job.tokens))
        self.metrics.prompt_tokens.inc(len(job.prompt_ids))
        if job.tokens and elapsed > 0:
            self.metrics.tokens_per_second.observe(len(job.tokens) / elapsed)
        job.emit(("done", answer, reason, len(job.prompt_ids), len(job.tokens)))


def _stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that begins a stop string (held back from a stream:
    the next token may complete the stop string, which is then cut from the answer)."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                if s.startswith(text[-n:])), default=0)


class _Streamer:
    """transformers streamer protocol (put/end): the prompt first, then one token per row."""

    def __init__(self, engine: Engine, batch: list[Job]):
        self.engine, self.batch, self.prompt_seen = engine, batch, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.engine.step(self.batch, value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class _Done(StoppingCriteria):
    """Stopping criterion: a row is done when its job finished or its client went away."""

    def __init__(self, batch: list[Job]):
        self.batch = batch

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.tensor([j.done or j.cancelled for j in self.batch],
                            dtype=torch.bool, device=input_ids.device)


# ---------------------------------------------------------------- the HTTP API

class _Lenient(BaseModel):
    # Fields OpenAI clients send that change nothing here (user, metadata, ...) are accepted.
    model_config = ConfigDict(extra="allow")


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class _Sampling(_Lenient):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: Any = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False


def _text(message: Message, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    parts = []
    for part in message.content:
        if part.get("type") != "text":
            raise APIError(400, f"messages[{index}].content: only text parts are supported "
                           f"(got {part.get('type')!r})", param=f"messages[{index}].content")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def chat_messages(messages: list[Message]) -> list[dict[str, str]]:
    """OpenAI messages as templates.format_messages takes them: optional system first, then
    user/assistant turns ending with a user turn."""
    out = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m, i)}
           for i, m in enumerate(messages)]
    system = [m for m in out if m["role"] == "system"]
    turns = [m for m in out if m["role"] != "system"]
    if len(system) > 1 or (system and out[0]["role"] != "system"):
        raise APIError(400, "messages: at most one system (or developer) message, and first",
                       param="messages")
    if not turns or turns[-1]["role"] != "user":
        raise APIError(400, "messages: the last message must be a user message",
                       param="messages")
    return system + turns


class Server:
    """The request handling shared by the endpoints: validate, tokenise, queue, answer."""

    def __init__(self, loaded: Loaded, engine: Engine, metrics: Metrics):
        self.loaded, self.engine, self.metrics = loaded, engine, metrics

    def check(self, req: _Sampling) -> None:
        if req.model != self.loaded.name:
            raise APIError(404, f"The model `{req.model}` does not exist; this server serves "
                           f"`{self.loaded.name}` (GET /v1/models)", param="model",
                           code="model_not_found")
        if req.n != 1:
            raise APIError(400, "n: only n=1 is supported", param="n")
        if req.logprobs:
            raise APIError(400, "logprobs: not supported by this server", param="logprobs")

    def job(self, req: _Sampling, prompt_ids: list[int], max_tokens: int | None) -> Job:
        d = self.loaded.defaults
        max_tokens = max_tokens or d.max_new_tokens
        if self.loaded.max_positions and len(prompt_ids) + max_tokens > self.loaded.max_positions:
            raise APIError(400, f"This model's maximum context length is "
                           f"{self.loaded.max_positions} tokens; the prompt has "
                           f"{len(prompt_ids)} and max_tokens is {max_tokens}",
                           param="max_tokens", code="context_length_exceeded")
        temperature = d.temperature if req.temperature is None else req.temperature
        do_sample = d.do_sample if req.temperature is None else req.temperature > 0
        top_p = d.top_p if req.top_p is None else req.top_p
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        sampling = (do_sample, temperature if do_sample else 1.0, top_p if do_sample else 1.0,
                    d.seed if req.seed is None else req.seed)
        return Job(prompt_ids=prompt_ids, max_tokens=max_tokens, sampling=sampling,
                   stop=tuple(s for s in stop if s), stream=req.stream,
                   loop=asyncio.get_running_loop(), events=asyncio.Queue())

    def chat_prompt(self, req: ChatRequest) -> list[int]:
        from medqlora.templates import format_messages
        text = format_messages(self.loaded.tokenizer, chat_messages(req.messages),
                               self.loaded.system)
        return self.loaded.tokenizer(text)["input_ids"]

    async def run(self, job: Job) -> tuple[str, str, int, int]:
        """Queue a job and wait for its answer (non-streaming)."""
        self.engine.submit(job)
        while True:
            event = await job.events.get()
            if event[0] == "error":
                raise APIError(500, event[1], "server_error")
            if event[0] == "done":
                return event[1], event[2], event[3], event[4]


    async def chat(self, req: ChatRequest):
        """POST /v1/chat/completions: a chat.completion, or a stream of chunks."""
        self.check(req)
        job = self.job(req, self.chat_prompt(req), req.max_completion_tokens or req.max_tokens)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.loaded.name}
        if req.stream:
            def chunk(text, reason, usage=None):
                choices = [] if usage else [{"index": 0, "finish_reason": reason, "delta": (
                    {"role": "assistant", "content": text} if text else {})}]
                return {**head, "object": "chat.completion.chunk", "choices": choices,
                        **({"usage": usage} if usage else {})}
            return self.stream(job, chunk, req)
        answer, reason, prompt, completion = await self.run(job)
        return {**head, "object": "chat.completion", "usage": _usage(prompt, completion),
                "choices": [{"index": 0, "finish_reason": reason, "logprobs": None,
                             "message": {"role": "assistant", "content": answer}}]}

    async def completions(self, req: CompletionRequest):
        """POST /v1/completions: raw prompts (no template), each answered as one choice."""
        self.check(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts or (req.stream and len(prompts) > 1):
            raise APIError(400, "prompt: one text to stream, or a non-empty list without "
                           "stream", param="prompt")
        jobs = [self.job(req, self.loaded.tokenizer(p)["input_ids"], req.max_tokens)
                for p in prompts]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.loaded.name, "object": "text_completion"}
        if req.stream:
            def chunk(text, reason, usage=None):
                choices = [] if usage else [{"index": 0, "text": text or "",
                                             "finish_reason": reason, "logprobs": None}]
                return {**head, "choices": choices, **({"usage": usage} if usage else {})}
            return self.stream(jobs[0], chunk, req)
        answers = await asyncio.gather(*(self.run(job) for job in jobs))
        choices = [{"index": i, "text": (prompts[i] if req.echo else "") + answer,
                    "finish_reason": reason, "logprobs": None}
                   for i, (answer, reason, _, _) in enumerate(answers)]
        return {**head, "choices": choices, "usage": _usage(
            sum(a[2] for a in answers), sum(a[3] for a in answers))}

    def stream(self, job: Job, chunk, req: _Sampling) -> StreamingResponse:
        """Queue the job now (an overloaded queue answers 503 before any byte is sent)."""
        self.engine.submit(job)
        include = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(_stream_events(job, chunk, include),
                                 media_type="text/event-stream")


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode("utf-8")


async def _stream_events(job: Job, chunk, include_usage: bool):
    """Server-sent events of a submitted job: one chunk per text delta, a last chunk with the
    finish_reason, the usage when asked for, then [DONE]."""
    try:
        while True:
            event = await job.events.get()
            if event[0] == "delta":
                yield _sse(chunk(event[1], None))
            elif event[0] == "error":
                yield _sse(APIError(500, event[1], "server_error").body())
                return
            else:
                _, _, reason, prompt, completion = event
                yield _sse(chunk("", reason))
                if include_usage:
                    yield _sse(chunk(None, None, _usage(prompt, completion)))
                yield b"data: [DONE]\n\n"
                return
    finally:
        if job.finish is None:
            job.cancelled = True   # the client went away: free the row at the next step


def _error_handlers(app) -> None:
    """Every error answers with OpenAI's body; an unexpected one is logged, never sent."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        count = len(err.errors())
        message = (f"{where or 'body'}: {first.get('msg', 'invalid request')}"
                   + (f" (and {count - 1} more problem(s))" if count > 1 else ""))
        return JSONResponse(APIError(400, message, param=where).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        type_ = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(err.status_code, str(err.detail), type_).body(),
                            status_code=err.status_code)

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(APIError(500, f"internal server error ({type(err).__name__}); "
                                     "see the server log", "server_error").body(), status_code=500)


def build_app(loaded: Loaded, engine: Engine, metrics: Metrics):
    """The FastAPI application (the engine is started and stopped with it)."""
    from contextlib import asynccontextmanager

    server = Server(loaded, engine, metrics)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="medqlora", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(_MetricsMiddleware, metrics=metrics)
    _error_handlers(app)

    @app.get("/health")
    async def health():
        if not engine.alive:
            raise APIError(503, "the generation worker is not running", "server_error")
        return {"status": "ok", "model": loaded.name}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": loaded.name, "object": "model",
                                            "created": 0, "owned_by": "medqlora"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        return await server.chat(req)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await server.completions(req)

    return app


class _MetricsMiddleware:
    """ASGI middleware: count every answer by status, and time it to its last body byte
    (so a stream's latency is the whole stream, not its first chunk)."""

    ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in self.ENDPOINTS else "other"
        start, status = time.perf_counter(), {"code": 500}
        body = bytearray()

        async def observe(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "http.response.body":
                if status["code"] >= 400 and len(body) < 4096:
                    body.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    self._record(endpoint, status["code"], time.perf_counter() - start, body)
            await send(message)

        try:
            await self.app(scope, receive, observe)
        except Exception:
            self._record(endpoint, 500, time.perf_counter() - start, b"")
            raise

    def _record(self, endpoint: str, code: int, seconds: float, body: bytes) -> None:
        self.metrics.requests.labels(endpoint, str(code)).inc()
        if endpoint != "/metrics":
            self.metrics.latency.labels(endpoint).observe(seconds)
        if code >= 400:
            try:
                type_ = json.loads(bytes(body))["error"]["type"]
            except (ValueError, KeyError, TypeError):
                type_ = "server_error" if code >= 500 else "invalid_request_error"
            self.metrics.errors.labels(endpoint, str(type_)).inc()


# ---------------------------------------------------------------- pulling and running

def pull_package(repo: str, rev: str, artifact: str, dest: str | Path) -> Path:
    """`dvc artifacts get REPO ARTIFACT --rev REV -o DEST`; then, when the adapter's base is a
    relative path missing here (models/tiny-med-llama), `dvc get` it from the same revision to
    that path, as docs/deploy.md lays out a deployment folder. A base the repository does not
    hold (a hub id such as mistralai/Mistral-7B-v0.1) is left to transformers to resolve."""
    import subprocess
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} exists: remove it or pass another --dest")
    cmd = ["dvc", "artifacts", "get", repo, artifact, "--rev", rev, "-o", str(dest)]
    log.info("pulling: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.strip()}")
    base = read_json(dest / "adapter_config.json").get("base_model_name_or_path") or ""
    if base and not Path(base).is_absolute() and not Path(base).exists():
        cmd = ["dvc", "get", repo, base, "--rev", rev, "-o", base]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            log.info("pulled the base: %s", " ".join(cmd))
        else:
            log.info("the base %s is not in %s at %s: transformers resolves it (hub id or "
                     "cache)", base, repo, rev)
    return dest


def serve(package_dir: str | Path, host: str = "127.0.0.1", port: int = 8000,
          merged: bool = False, name: str | None = None, max_batch_size: int = 8,
          batch_wait_ms: float = 10.0, max_queue: int = 256) -> None:
    """Load a (verified) package and serve it until interrupted."""
    loaded = load_package(package_dir, merged, name)
    metrics = Metrics()
    engine = Engine(loaded, metrics, max_batch_size, batch_wait_ms, max_queue)
    app = build_app(loaded, engine, metrics)
    log.info("serving %s (%s) on http://%s:%d/v1", loaded.name, package_dir, host, port)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
