"""The server's batching engine: one worker thread owns the model and decodes queued jobs.

It takes the oldest request, waits up to --batch-wait-ms for others with the same sampling
settings (at most --max-batch-size), and runs them as one left-padded model.generate, with the
GenerationConfig and padding evaluate and `medqlora generate` use. Tokens reach each request
through a streamer as they are decoded, so streaming and time to first token are real; a request
whose answer ended (eos, its max_tokens, a stop string, or a client that went away) stops
costing compute at the next step. This is dynamic batching, not vLLM's continuous batching: a
request that arrives during a batch waits for the next one.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria

from medqlora.core.outputs import read_json
from medqlora.data.templates import stop_ids
from medqlora.evaluate import generation
from medqlora.ship.serve.metrics import Metrics

log = logging.getLogger(__name__)


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
    max_positions: int | None


def load_package(package_dir: str | Path, merged: bool = False,
                 name: str | None = None) -> Loaded:
    """The package's model as `medqlora generate` loads it (call verify first)."""
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
        self.stops = set(stop_ids(loaded.tokenizer))

    def start(self) -> None:
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
        for job, token in zip(batch, tokens):
            if job.done or job.cancelled:
                continue
            if job.first_token_at is None:
                job.first_token_at = now
                self.metrics.ttft.observe(now - job.created)
            if token in self.stops:   # eos or the chat template's end of turn
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
