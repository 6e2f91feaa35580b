"""`medqlora serve`: a verified package over the OpenAI HTTP API, with Prometheus metrics.

    medqlora serve artifacts/package --port 8000                 # a package folder
    medqlora serve --repo https://git.example.org/team/medqlora --rev v1.0.0 \
        --artifact medqlora-tiny-med                             # dvc artifacts get, verify, serve
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"model": "medqlora-tiny-med", "messages": [{"role": "user", "content": "What is anaemia?"}]}'

Endpoints: GET /v1/models, POST /v1/chat/completions (stream or not), POST /v1/completions,
GET /health, GET /metrics (Prometheus text). FastAPI on uvicorn; imported at the top, so the
project image's build (which imports every medqlora module) fails if its lock lacks them.
With --api-key every route but /health (and /metrics with --public-metrics) needs the key;
bodies over --max-body-bytes get 413 (guards). No /docs, /redoc or /openapi.json: the API is
OpenAI's, documented in docs/deploy.md.

One decoding path. The model is loaded by generation.load_for_generation (as `medqlora
generate` loads it, decode copy included), chat prompts are built by templates.format_messages
(the template and system text of training), and every request is decoded by the same
continuous-batching Decoder (medqlora/evaluate/decoding.py) evaluate and `medqlora generate`
use; an answer is the new tokens up to eos or end of turn, decoded without special tokens and
stripped, as generation does. So greedy answers equal `medqlora generate`'s
(tests/test_serving.py checks it).

Modules: api (this HTTP layer, pulling and running), engine (the continuous-batching worker),
metrics (Prometheus series and the middleware that records them), guards (API key and body
limit), errors (OpenAI's error body).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from medqlora.core.outputs import read_json
from medqlora.ship.serve.engine import Engine, Job, Loaded, Overloaded, load_package
from medqlora.ship.serve.errors import APIError
from medqlora.ship.serve.guards import (ApiKeyMiddleware, BodyLimitMiddleware, Guards,
                                        exposure_warnings)
from medqlora.ship.serve.metrics import Metrics, MetricsMiddleware

log = logging.getLogger(__name__)


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
    # transformers.set_seed seeds numpy, whose seeds are 0 <= seed < 2**32.
    seed: int | None = Field(None, ge=0, lt=2**32)
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
    """The request handling shared by the endpoints: validate, tokenise, queue, answer.

    Tokenising runs in a worker thread (asyncio.to_thread; the tokenizers library releases the
    GIL): a prompt near --max-body-bytes takes about a second to tokenise on one CPU core, and on
    the event loop it would hold up every other request, /health included."""

    def __init__(self, loaded: Loaded, engine: Engine, metrics: Metrics):
        self.loaded, self.engine, self.metrics = loaded, engine, metrics

    def check(self, req: _Sampling) -> None:
        """Refuse what no generation could serve: invalid text, another model, n > 1, logprobs."""
        where = lone_surrogate(req.model_dump())
        if where is not None:
            raise APIError(400, f"{where or 'body'}: not valid Unicode (a lone surrogate, such "
                           "as an unpaired \\ud800 escape); send the text as UTF-8",
                           param=where or None)
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
                           f"{self.loaded.max_positions} tokens (the model's, or the server's "
                           f"--max-context); the prompt has "
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
        """The token ids of a chat request's prompt (the training template); blocking."""
        from medqlora.data.templates import format_messages
        text = format_messages(self.loaded.tokenizer, chat_messages(req.messages),
                               self.loaded.system)
        return self.loaded.tokenizer(text)["input_ids"]

    def tokenise(self, prompts: list[str]) -> list[list[int]]:
        """The token ids of raw prompts; blocking."""
        return [self.loaded.tokenizer(p)["input_ids"] for p in prompts]

    async def answers(self, jobs: list[Job]) -> list[tuple[str, str, int, int]]:
        """Queue a request's jobs (all or none) and wait for their answers (non-streaming).
        Jobs still unfinished when this ends (another failed, or the request was cancelled)
        are cancelled, so they stop costing compute at the next step."""
        self.engine.submit(jobs)
        try:
            return [await _answer(job) for job in jobs]
        finally:
            for job in jobs:
                if job.finish is None:
                    job.cancelled = True

    async def chat(self, req: ChatRequest):
        """POST /v1/chat/completions: a chat.completion, or a stream of chunks."""
        self.check(req)
        ids = await asyncio.to_thread(self.chat_prompt, req)
        job = self.job(req, ids, req.max_completion_tokens or req.max_tokens)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.loaded.name}
        if req.stream:
            def chunk(text, reason, usage=None):
                choices = [] if usage else [{"index": 0, "finish_reason": reason, "delta": (
                    {"role": "assistant", "content": text} if text else {})}]
                return {**head, "object": "chat.completion.chunk", "choices": choices,
                        **({"usage": usage} if usage else {})}
            return self.stream(job, chunk, req)
        [(answer, reason, prompt, completion)] = await self.answers([job])
        return {**head, "object": "chat.completion", "usage": _usage(prompt, completion),
                "choices": [{"index": 0, "finish_reason": reason, "logprobs": None,
                             "message": {"role": "assistant", "content": answer}}]}

    def prompts(self, req: CompletionRequest) -> list[str]:
        """A completion request's prompts; more than --max-queue could never be queued at
        once, so they get 400 here rather than a 503 that retrying cannot cure."""
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts or (req.stream and len(prompts) > 1):
            raise APIError(400, "prompt: one text to stream, or a non-empty list without "
                           "stream", param="prompt")
        if len(prompts) > self.engine.max_queue:
            raise APIError(400, f"prompt: {len(prompts)} prompts; this server takes at most "
                           f"{self.engine.max_queue} in one request (--max-queue)",
                           param="prompt")
        return prompts

    async def completions(self, req: CompletionRequest):
        """POST /v1/completions: raw prompts (no template), each answered as one choice."""
        self.check(req)
        prompts = self.prompts(req)
        ids = await asyncio.to_thread(self.tokenise, prompts)
        jobs = [self.job(req, prompt_ids, req.max_tokens) for prompt_ids in ids]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.loaded.name, "object": "text_completion"}
        if req.stream:
            def chunk(text, reason, usage=None):
                choices = [] if usage else [{"index": 0, "text": text or "",
                                             "finish_reason": reason, "logprobs": None}]
                return {**head, "choices": choices, **({"usage": usage} if usage else {})}
            return self.stream(jobs[0], chunk, req)
        answers = await self.answers(jobs)
        choices = [{"index": i, "text": (prompts[i] if req.echo else "") + answer,
                    "finish_reason": reason, "logprobs": None}
                   for i, (answer, reason, _, _) in enumerate(answers)]
        return {**head, "choices": choices, "usage": _usage(
            sum(a[2] for a in answers), sum(a[3] for a in answers))}

    def stream(self, job: Job, chunk, req: _Sampling) -> StreamingResponse:
        """Queue the job now (an overloaded queue answers 503 before any byte is sent)."""
        self.engine.submit([job])
        include = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(_stream_events(job, chunk, include),
                                 media_type="text/event-stream")


async def _answer(job: Job) -> tuple[str, str, int, int]:
    """Wait for a queued job's answer: (text, finish_reason, prompt tokens, completion tokens)."""
    while True:
        event = await job.events.get()
        if event[0] == "error":
            raise APIError(500, event[1], "server_error")
        if event[0] == "done":
            return event[1], event[2], event[3], event[4]


# Code points U+D800-U+DFFF: JSON's \uXXXX escapes can carry them unpaired, but no UTF-8 text
# (the tokenizer's input, the answer's encoding) can hold one.
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(value: Any, path: str = "") -> str | None:
    """Where a parsed request holds a lone surrogate, as OpenAI names fields
    (messages[0].content, prompt[2]; "" for the body itself), or None when it holds none."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if isinstance(key, str) and _SURROGATE.search(key):
            return path                     # a key can't be named in a message: its parent
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key
        found = lone_surrogate(item, where)
        if found is not None:
            return found
    return None


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
        return err.response()

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, err: Overloaded):
        return APIError(503, str(err), "server_overloaded", code="server_overloaded").response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        if first.get("type") == "json_invalid":
            return APIError(400, _json_problem(first, err.body)).response()
        where = _param(first.get("loc", ()))
        count = len(err.errors())
        message = (f"{where or 'body'}: {first.get('msg', 'invalid request')}"
                   + (f" (and {count - 1} more problem(s))" if count > 1 else ""))
        return APIError(400, message, param=where).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        type_ = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return APIError(err.status_code, str(err.detail), type_,
                        headers=err.headers).response()

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, f"internal server error ({type(err).__name__}); see the server "
                        "log", "server_error").response()


def _param(loc: tuple) -> str | None:
    """A pydantic error location as OpenAI names the field:
    ("body", "messages", 0, "content") -> "messages[0].content"; the body itself -> None."""
    name = ""
    for part in loc[1:]:
        name += f"[{part}]" if isinstance(part, int) else f".{part}" if name else str(part)
    return name or None


def _json_problem(error: dict, doc: Any) -> str:
    """FastAPI's json_invalid error (its loc ends with the character offset) as json's own
    line and column: "body: invalid JSON at line 1 column 54 (Expecting value)"."""
    pos = error["loc"][-1]
    doc = doc if isinstance(doc, str) else ""
    line, column = doc.count("\n", 0, pos) + 1, pos - doc.rfind("\n", 0, pos)
    reason = (error.get("ctx") or {}).get("error", "JSON decode error")
    return f"body: invalid JSON at line {line} column {column} ({reason})"


def build_app(loaded: Loaded, engine: Engine, metrics: Metrics, guards: Guards = Guards()):
    """The FastAPI application (the engine is started and stopped with it). Middlewares, outer
    first: metrics (so refused requests are counted too), the API key (checked before any body
    is read), the body limit."""
    from contextlib import asynccontextmanager

    server = Server(loaded, engine, metrics)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="medqlora", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(BodyLimitMiddleware, max_bytes=guards.max_body_bytes)
    if guards.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=guards.api_key,
                           open_paths=guards.open_paths())
    app.add_middleware(MetricsMiddleware, metrics=metrics)    # added last: the outermost
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
          merged: bool = False, name: str | None = None, max_batch_size: int = 16,
          batch_wait_ms: float = 10.0, max_queue: int = 256, max_context: int = 2048,
          guards: Guards = Guards()) -> None:
    """Load a (verified) package and serve it until interrupted."""
    for warning in exposure_warnings(host, guards):
        log.warning(warning)
    loaded = load_package(package_dir, merged, name, max_context)
    metrics = Metrics()
    engine = Engine(loaded, metrics, max_batch_size, batch_wait_ms, max_queue)
    app = build_app(loaded, engine, metrics, guards)
    log.info("serving %s (%s) on http://%s:%d/v1", loaded.name, package_dir, host, port)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
