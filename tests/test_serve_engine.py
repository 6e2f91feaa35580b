"""The server's engine on a real model (the embedded tiny base): a request that arrives while
another decodes joins the running batch, and both answers equal their lone decodes."""
from __future__ import annotations

import asyncio

import pytest
import torch

from conftest import TINY_MODEL
from medqlora.evaluate.decoding import Decoder, Request
from medqlora.ship.serve.engine import Defaults, Engine, Job, Loaded
from medqlora.ship.serve.metrics import Metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loaded() -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(TINY_MODEL), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_MODEL))
    return Loaded(model=model, tokenizer=tokenizer, name="tiny", system="",
                  defaults=Defaults(16, False, 1.0, 1.0, 0), max_positions=256)


def alone(loaded: Loaded, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of one request decoded by itself, without stop ids."""
    request = Request(prompt, max_tokens)
    Decoder(loaded.model, [], rows=1, columns=len(prompt) + max_tokens).run([request])
    return request.tokens


def test_a_request_joins_the_running_batch(loaded, monkeypatch):
    engine = Engine(loaded, Metrics(), max_batch_size=4, batch_wait_ms=0)
    monkeypatch.setattr(engine, "stops", set())     # the tiny base: decode to max_tokens
    first, second = [5, 17, 33, 90, 12, 7], [44, 8, 301, 2000, 15]
    order: list[tuple[str, str]] = []

    async def drive() -> tuple[Job, Job]:
        loop = asyncio.get_running_loop()

        def job(ids: list[int], max_tokens: int) -> Job:
            return Job(prompt_ids=ids, max_tokens=max_tokens, sampling=(False, 1.0, 1.0, 0),
                       stop=(), stream=True, loop=loop, events=asyncio.Queue())

        engine.start()
        try:
            long, short = job(first, 60), job(second, 6)
            engine.submit([long])
            for _ in range(3):                # the long answer is decoding ...
                assert (await asyncio.wait_for(long.events.get(), 60))[0] == "delta"
            engine.submit([short])            # ... when the short request arrives
            pending = {"long": long, "short": short}
            while pending:
                for name, j in list(pending.items()):
                    while not j.events.empty():
                        kind = j.events.get_nowait()[0]
                        order.append((name, kind))
                        if kind == "done":
                            del pending[name]
                await asyncio.sleep(0.001)
            return long, short
        finally:
            await asyncio.to_thread(engine.stop)

    long, short = asyncio.run(drive())
    # The short request finished while the long one was still decoding: it joined the batch
    # instead of waiting for the long answer to end.
    assert order.index(("short", "done")) < order.index(("long", "done"))
    assert ("long", "delta") in order[order.index(("short", "done")):]
    assert (long.finish, len(long.tokens), short.finish, len(short.tokens)) == (
        "length", 60, "length", 6)
    # Joining changed neither answer.
    assert long.tokens == alone(loaded, first, 60)
    assert short.tokens == alone(loaded, second, 6)
    steps = {s.name: s.value for f in engine.metrics.registry.collect()
             for s in f.samples if f.name == "medqlora_batch_size"}
    assert steps["medqlora_batch_size_sum"] > steps["medqlora_batch_size_count"]  # 2 rows a step
