"""The server's engine: one worker thread owns the model and decodes every request through
one continuous-batching Decoder (medqlora/evaluate/decoding.py), the path evaluate scored.

Requests join the running batch between decode steps, up to --max-batch-size rows: a request
that arrives while others decode is prefilled and decodes with them from the next step, and
a row that ends (eos or end of turn, its max_tokens, a stop string, or a client that went away)
frees its slot at once. Rows may sample with different settings (each has its own seeded
generator). Tokens reach each request as they are decoded, so streaming and time to first token
are real. Requests beyond the free rows wait in the queue (--max-queue, then 503). On a GPU the
decode step is captured as CUDA graphs at startup, one per batch size.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medqlora.core.outputs import read_json
from medqlora.data.templates import stop_ids
from medqlora.evaluate.decoding import Decoder, Request
from medqlora.ship.serve.metrics import Metrics

log = logging.getLogger(__name__)
# Cache positions per row when the model's config names no maximum (or --max-context is unset).
DEFAULT_CONTEXT = 4096


class Overloaded(RuntimeError):
    """The queue is full: answered 503 (server_overloaded) by the API."""


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
    max_positions: int         # prompt + max_tokens of one request (the KV cache's columns)


def load_package(package_dir: str | Path, merged: bool = False, name: str | None = None,
                 max_context: int = DEFAULT_CONTEXT) -> Loaded:
    """The package's model as `medqlora generate` loads it (call verify first). A request's
    prompt + max_tokens may use at most `max_context` positions (the model's own maximum when
    smaller): the KV cache holds that many for every row."""
    from medqlora.evaluate.generation import load_for_generation
    package_dir = Path(package_dir)
    meta = read_json(package_dir / "meta.json")
    model, tokenizer = load_for_generation(package_dir, merged)
    config = getattr(model, "config", None)
    return Loaded(model=model, tokenizer=tokenizer,
                  name=name or meta.get("params", {}).get("package", {}).get("name")
                  or package_dir.name,
                  system=meta.get("prompt", {}).get("system", ""),
                  defaults=Defaults.from_package(package_dir),
                  max_positions=min(getattr(config, "max_position_embeddings", None)
                                    or max_context, max_context))


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
    """A worker thread that owns the model and decodes every job through one Decoder."""

    def __init__(self, loaded: Loaded, metrics: Metrics, max_batch_size: int = 8,
                 batch_wait_ms: float = 10.0, max_queue: int = 256):
        self.loaded, self.metrics = loaded, metrics
        self.max_batch_size, self.batch_wait = max_batch_size, batch_wait_ms / 1000.0
        self.max_queue = max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="medqlora-engine", daemon=True)
        self.device = next(loaded.model.parameters()).device
        self.stops = set(stop_ids(loaded.tokenizer))
        self.decoder = None     # made by start(), in the thread that starts the server
        self._live: dict[Request, Job] = {}
        self._stopping = False

    def _decoder(self) -> Decoder:
        return Decoder(self.loaded.model, self.stops, rows=self.max_batch_size,
                       columns=self.loaded.max_positions,
                       pad_id=self.loaded.tokenizer.pad_token_id or 0)

    def start(self) -> None:
        self.decoder = self._decoder()
        if self.decoder.graphs:   # capture every batch size before the first request
            self.decoder.warm(self.loaded.tokenizer("warm-up")["input_ids"] or [0])
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, jobs: list[Job]) -> None:
        """Queue a request's jobs, all or none: when they do not all fit under max_queue,
        Overloaded is raised and none is queued (a 503 must not leave work running)."""
        with self._lock:
            if self._waiting + len(jobs) > self.max_queue:
                raise Overloaded(f"the server has {self._waiting} requests waiting and this one "
                                 f"adds {len(jobs)} (--max-queue {self.max_queue}); retry later")
            self._waiting += len(jobs)
            self.metrics.queue_depth.set(self._waiting)
        for job in jobs:
            self._queue.put(job)

    # ---------------------------------------------------------------- the worker

    def _take(self) -> list[Job]:
        """Jobs to join the running batch: as many as there are free rows. When nothing runs,
        block for the first and wait up to --batch-wait-ms for others (they prefill together);
        while the batch runs, take only what has already arrived."""
        free = self.max_batch_size - len(self._live)
        jobs: list[Job] = []
        idle = not self._live
        deadline = None
        while len(jobs) < free and not self._stopping:
            try:
                if idle and not jobs:
                    job = self._queue.get()
                    deadline = time.monotonic() + self.batch_wait
                elif idle:
                    job = self._queue.get(timeout=max(deadline - time.monotonic(), 1e-4))
                else:
                    job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._stopping = True
                break
            jobs.append(job)
        if jobs:
            with self._lock:
                self._waiting -= len(jobs)
                self.metrics.queue_depth.set(self._waiting)
        return jobs

    def _run(self) -> None:
        while True:
            for job in self._take():
                request = Request(job.prompt_ids, job.max_tokens, *job.sampling)
                self._live[request] = job
                try:
                    self.decoder.submit(request)
                except ValueError as err:
                    self._fail([request], str(err))
            for request, job in list(self._live.items()):
                if job.cancelled and not job.done:
                    self.decoder.cancel(request)
                    del self._live[request]
            if not self._live:
                if self._stopping:
                    return
                continue
            try:
                touched = self.decoder.step()
            except Exception as err:  # noqa: BLE001 - one failed step must not stop the server
                log.exception("decoding failed with %d requests running", len(self._live))
                self._fail(list(self._live), f"generation failed: {type(err).__name__}: {err}")
                self.decoder = self._decoder()   # a fresh cache: the failed one may be torn
                continue
            if touched:   # the rows that prefilled or decoded in this step
                self.metrics.batch_size.observe(len(touched))
            for request in touched:
                job = self._live.get(request)
                if job is not None:
                    self._advance(job, request)
                    if job.done or job.cancelled:
                        self.decoder.cancel(request)   # no-op when the decoder finished it
                        del self._live[request]

    def _fail(self, requests: list[Request], message: str) -> None:
        for request in requests:
            job = self._live.pop(request, None)
            if job is not None and not job.done:
                job.done = True
                job.emit(("error", message))

    def _advance(self, job: Job, request: Request) -> None:
        """Take the request's new tokens into the job: text, stop strings, stream, finish."""
        now = time.perf_counter()
        for token in request.tokens[len(job.tokens):]:
            if job.done:
                return
            if job.first_token_at is None:
                job.first_token_at = now
                self.metrics.ttft.observe(now - job.created)
            job.tokens.append(token)
            text = self.loaded.tokenizer.decode(job.tokens, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
            if cut >= 0:
                job.text = text[:cut]
                self._finish(job, "stop")
                return
            job.text = text
            if job.stream:
                self._stream(job, text[:len(text) - _stop_prefix(text, job.stop)], final=False)
        if request.finish == "stop":        # eos or the chat template's end of turn
            if job.first_token_at is None:
                job.first_token_at = now
                self.metrics.ttft.observe(now - job.created)
            self._finish(job, "stop")
        elif request.finish == "length":
            self._finish(job, "length")

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
        """Answer a job as soon as its row ends (the others decode on)."""
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
