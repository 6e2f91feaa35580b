"""`medqlora serve`'s HTTP layer without a model (the fast tier): the real FastAPI app, its
middlewares and the engine's queue and batching thread, with model.generate replaced by a fixed
answer (EchoEngine) and the tiny model's tokenizer. Issue 27: malformed JSON, seeds, lone
surrogates, the body limit, tokenising off the event loop, all-or-nothing queueing, abandoned
streams in the metrics, and the API key. tests/test_serving.py runs the real server."""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient

from conftest import TINY_MODEL
from medqlora import cli
from medqlora.ship.serve import api
from medqlora.ship.serve.engine import Defaults, Engine, Job, Loaded, Overloaded
from medqlora.ship.serve.guards import Guards, exposure_warnings
from medqlora.ship.serve.metrics import Metrics, MetricsMiddleware

NAME = "tiny"
ANSWER = "Iron deficiency is the commonest cause."
CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "What is anaemia?"}]


class EchoDecoder:
    """The Decoder's interface without a model: a request is seeded as the real one is, then
    answers ANSWER's tokens and stops at its first step."""
    graphs = False

    def __init__(self, tokens: list[int]):
        self.tokens, self.running = tokens, []

    @property
    def active(self):
        return self.running

    def submit(self, request) -> None:
        request.generator = torch.Generator().manual_seed(request.seed)
        self.running.append(request)

    def cancel(self, request) -> None:
        if request in self.running:
            self.running.remove(request)

    def step(self):
        done, self.running = self.running, []
        for request in done:
            request.tokens, request.finish = list(self.tokens), "stop"
        return done


class EchoEngine(Engine):
    """The real queue and worker thread; every job answers ANSWER instead of running a model."""

    def _decoder(self) -> EchoDecoder:
        return EchoDecoder(self.loaded.tokenizer(ANSWER, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(TINY_MODEL))


def loaded(tokenizer) -> Loaded:
    # The engine reads the model's device from its first parameter, and nothing else of it.
    model = SimpleNamespace(parameters=lambda: iter([torch.zeros(1)]))
    return Loaded(model=model, tokenizer=tokenizer, name=NAME, system="",
                  defaults=Defaults(16, False, 1.0, 1.0, 0), max_positions=1024)


@contextmanager
def served(tokenizer, guards: Guards = Guards(), max_queue: int = 8, started: bool = True):
    """A TestClient on the app; `started` runs the lifespan (the engine's thread)."""
    metrics = Metrics()
    engine = EchoEngine(loaded(tokenizer), metrics, max_queue=max_queue)
    client = TestClient(api.build_app(loaded(tokenizer), engine, metrics, guards),
                        raise_server_exceptions=False)
    if started:
        with client:
            yield SimpleNamespace(client=client, engine=engine, metrics=metrics)
    else:
        yield SimpleNamespace(client=client, engine=engine, metrics=metrics)


def post(client, path: str, text: str | bytes, **headers):
    """POST a JSON body sent as is (json.dumps escapes a lone surrogate as \\ud800)."""
    return client.post(path, content=text.encode() if isinstance(text, str) else text,
                       headers={"Content-Type": "application/json", **headers})


def count(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def error(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# ---------------------------------------------------------------- 1. malformed JSON

@pytest.mark.parametrize("body, where", [
    # the case: a character offset (47) came back as `param: "47"`
    ('{"model": "tiny", "messages": [{"role": "user" "content": "hi"}]}',
     "line 1 column 48 (Expecting ',' delimiter)"),
    ('{"model": "tiny",\n "messages": [}', "line 2 column 15 (Expecting value)"),
])
def test_malformed_json_names_line_and_column_and_no_param(tokenizer, body, where):
    with served(tokenizer) as s:
        response = post(s.client, CHAT, body)
    assert response.status_code == 400
    assert error(response) == {"message": f"body: invalid JSON at {where}",
                               "type": "invalid_request_error", "param": None, "code": None}


def test_validation_errors_name_fields_as_openai_does(tokenizer):
    with served(tokenizer) as s:
        response = s.client.post(CHAT, json={"model": NAME, "messages": [
            {"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]})
    assert response.status_code == 400
    assert error(response)["param"] == "messages[1].role"
    assert error(response)["message"].startswith("messages[1].role: Input should be ")


# ---------------------------------------------------------------- 2. seed

@pytest.mark.parametrize("seed, problem", [(2**32, "less than 4294967296"),
                                           (-1, "greater than or equal to 0")])
def test_a_seed_set_seed_refuses_is_a_400(tokenizer, seed, problem):
    with served(tokenizer) as s:
        response = s.client.post(CHAT, json={"model": NAME, "messages": HI, "seed": seed})
        assert response.status_code == 400
        assert error(response) == {"message": f"seed: Input should be {problem}",
                                   "type": "invalid_request_error", "param": "seed",
                                   "code": None}
        edge = s.client.post(CHAT, json={"model": NAME, "messages": HI, "seed": 2**32 - 1})
    assert edge.status_code == 200        # the largest seed set_seed takes still runs
    assert edge.json()["choices"][0]["message"]["content"] == ANSWER


# ---------------------------------------------------------------- 3. lone surrogates

@pytest.mark.parametrize("path, request_body, param", [
    (CHAT, {"model": NAME, "messages": [{"role": "user", "content": "a\ud800b"}]},
     "messages[0].content"),
    (CHAT, {"model": NAME, "messages": [{"role": "system", "content": "ok"},
                                        {"role": "user", "content": "\udfff"}]},
     "messages[1].content"),
    (CHAT, {"model": NAME, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "x\ud800"}]}]}, "messages[0].content[0].text"),
    (CHAT, {"model": "\ud800", "messages": HI}, "model"),
    ("/v1/completions", {"model": NAME, "prompt": "\ud800"}, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": ["fine", "bad \udbff"]}, "prompt[1]"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field(tokenizer, path, request_body, param):
    with served(tokenizer) as s:
        response = post(s.client, path, json.dumps(request_body))
        assert response.status_code == 400
        assert error(response)["param"] == param
        assert error(response)["message"].startswith(f"{param}: not valid Unicode")
        assert s.client.get("/health").status_code == 200


def test_a_surrogate_pair_is_text_not_an_error(tokenizer):
    with served(tokenizer) as s:       # "\ud83e\ude7a" in JSON is U+1FA7A, a real character
        response = post(s.client, CHAT, json.dumps(
            {"model": NAME, "messages": [{"role": "user", "content": "\U0001fa7a hurts"}]}))
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == ANSWER


# ---------------------------------------------------------------- 4. body limit, the loop

def asgi_post(app, chunks: list[bytes], headers=()) -> tuple[int, dict, int]:
    """POST `chunks` to an ASGI app as a chunked upload (no Content-Length) straight through
    ASGI (TestClient reads a whole body before the app sees any): the status, the JSON body,
    and how many chunks the app read."""
    read, sent = 0, []

    async def receive():
        nonlocal read
        if read == len(chunks):
            return {"type": "http.disconnect"}
        read += 1
        return {"type": "http.request", "body": chunks[read - 1], "more_body": read < len(chunks)}

    async def send(message):
        sent.append(message)
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": "POST", "scheme": "http", "path": CHAT,
             "raw_path": CHAT.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), *headers],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body), read


def test_a_body_over_the_limit_is_a_413_from_its_content_length(tokenizer):
    with served(tokenizer, Guards(max_body_bytes=1000)) as s:
        response = post(s.client, CHAT, b" " * 1001)
        assert response.status_code == 413
        assert error(response) == {
            "message": "body: larger than this server's limit of 1000 bytes (medqlora serve "
                       "--max-body-bytes)", "type": "invalid_request_error", "param": None,
            "code": "request_too_large"}
        assert count(s.metrics, "medqlora_requests_total", endpoint=CHAT, status="413") == 1
        declared = [(b"content-length", b"20000")]
        status, body, read = asgi_post(s.client.app, [b" " * 400] * 50, declared)
    assert (status, body["error"]["code"], read) == (413, "request_too_large", 0)  # none read


def test_a_streamed_body_is_cut_off_once_it_passes_the_limit(tokenizer):
    with served(tokenizer, Guards(max_body_bytes=1000), started=False) as s:
        status, body, read = asgi_post(s.client.app, [b" " * 400] * 50)   # 20,000 bytes offered
    assert (status, body["error"]["code"]) == (413, "request_too_large")
    assert read == 3       # 400 + 400 + 400 > 1000: the rest is never read


def test_a_body_exactly_at_the_limit_is_served(tokenizer):
    body = json.dumps({"model": NAME, "messages": HI})
    body += " " * (1000 - len(body))
    with served(tokenizer, Guards(max_body_bytes=1000)) as s:
        response = post(s.client, CHAT, body)
    assert len(body) == 1000 and response.status_code == 200


class SlowTokenizer:
    """The tiny tokenizer, one second slower on long texts (as a 1 MB prompt is on one core);
    `started` is set when such a call begins, `finished` when it ends."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.started, self.finished = threading.Event(), threading.Event()

    def __call__(self, text, *args, **kwargs):
        if len(text) > 10_000:
            self.started.set()
            time.sleep(1.0)
            self.finished.set()
        return self.tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("path, request_body", [
    (CHAT, {"model": NAME, "messages": [{"role": "user", "content": "anaemia " * 2000}]}),
    ("/v1/completions", {"model": NAME, "prompt": ["short", "anaemia " * 2000]}),
])
def test_tokenising_runs_off_the_event_loop(tokenizer, path, request_body):
    slow = SlowTokenizer(tokenizer)
    with served(slow) as s, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(s.client.post, path, json=request_body)
        assert slow.started.wait(10)
        start = time.perf_counter()
        health = s.client.get("/health")
        seconds = time.perf_counter() - start
        assert not slow.finished.is_set(), "the health check waited for the tokeniser"
        response = pending.result(timeout=30)
    assert health.status_code == 200 and seconds < 0.5, seconds
    # 2,000 x "anaemia " is more than the 1,024 positions: answered, after tokenising
    assert response.status_code == 400
    assert error(response)["code"] == "context_length_exceeded"


# ---------------------------------------------------------------- 5. queue room

def job() -> Job:
    return Job(prompt_ids=[1], max_tokens=1, sampling=(False, 1.0, 1.0, 0), stop=(),
               stream=False, loop=None, events=None)


def test_the_engine_queues_a_request_all_or_none(tokenizer):
    metrics = Metrics()
    engine = Engine(loaded(tokenizer), metrics, max_queue=3)    # not started: jobs stay queued
    engine.submit([job(), job()])
    with pytest.raises(Overloaded, match="2 requests waiting and this one adds 2"):
        engine.submit([job(), job()])
    assert engine._queue.qsize() == 2 and count(metrics, "medqlora_queue_depth") == 2
    engine.submit([job()])
    assert engine._queue.qsize() == 3 and count(metrics, "medqlora_queue_depth") == 3


def within(seconds: float, fn, *args, **kwargs):
    """fn's result, run in a daemon thread: a request left waiting (its jobs queued on an
    engine that never runs) fails the test instead of hanging the suite."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(result=fn(*args, **kwargs)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert "result" in out, f"no answer in {seconds} s: were some of its jobs queued?"
    return out["result"]


def test_completions_that_do_not_fit_queue_nothing(tokenizer):
    with served(tokenizer, max_queue=4, started=False) as s:   # no worker: the queue only fills
        s.engine.submit([job(), job()])
        overloaded = within(10, s.client.post, "/v1/completions",
                            json={"model": NAME, "prompt": ["a", "b", "c"]})
        assert overloaded.status_code == 503
        assert error(overloaded)["code"] == "server_overloaded"
        assert s.engine._queue.qsize() == 2      # none of the three was queued
        too_many = within(10, s.client.post, "/v1/completions",
                          json={"model": NAME, "prompt": ["a"] * 5})
        assert too_many.status_code == 400
        assert error(too_many) == {
            "message": "prompt: 5 prompts; this server takes at most 4 in one request "
                       "(--max-queue)", "type": "invalid_request_error", "param": "prompt",
            "code": None}
        assert s.engine._queue.qsize() == 2


def test_completions_answer_every_prompt(tokenizer):
    with served(tokenizer, max_queue=4) as s:
        response = s.client.post("/v1/completions", json={"model": NAME,
                                                           "prompt": ["a", "b", "c", "d"]})
        assert response.status_code == 200
        assert [c["text"] for c in response.json()["choices"]] == [ANSWER] * 4
        answer_tokens = len(tokenizer(ANSWER, add_special_tokens=False)["input_ids"])
        assert response.json()["usage"]["completion_tokens"] == 4 * answer_tokens == 40
        assert count(s.metrics, "medqlora_queue_depth") == 0


# ---------------------------------------------------------------- 6. abandoned streams

async def abandoned(scope, receive, send):
    """What starlette's StreamingResponse does when its client disconnects: the stream task is
    cancelled after some chunks, and the response ends without its last body message."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})


async def cancelled(scope, receive, send):
    await abandoned(scope, receive, send)
    raise asyncio.CancelledError


async def drive(app) -> None:
    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        pass
    await app({"type": "http", "path": CHAT, "method": "POST", "headers": []}, receive, send)


@pytest.mark.parametrize("inner", [abandoned, cancelled])
def test_an_abandoned_stream_is_counted_as_499(inner):
    metrics = Metrics()
    try:
        asyncio.run(drive(MetricsMiddleware(inner, metrics)))
    except asyncio.CancelledError:
        assert inner is cancelled
    assert count(metrics, "medqlora_requests_total", endpoint=CHAT, status="499") == 1
    assert count(metrics, "medqlora_requests_total", endpoint=CHAT, status="200") == 0
    assert count(metrics, "medqlora_request_latency_seconds_count", endpoint=CHAT) == 1
    assert not [s for f in metrics.registry.collect() if f.name == "medqlora_request_errors"
                for s in f.samples if s.name.endswith("_total")]   # 499 is not a server error


def test_a_finished_stream_is_counted_once_as_200(tokenizer):
    with served(tokenizer) as s:
        text = s.client.post(CHAT, json={"model": NAME, "messages": HI, "stream": True}).text
        chunks = [json.loads(line[6:]) for line in text.splitlines()
                  if line.startswith("data: {")]
        streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text.endswith("data: [DONE]\n\n") and streamed == ANSWER
        assert count(s.metrics, "medqlora_requests_total", endpoint=CHAT, status="200") == 1
        assert count(s.metrics, "medqlora_requests_total", endpoint=CHAT, status="499") == 0


# ---------------------------------------------------------------- 7. the API key

KEY = "s3cret-key"


def test_the_api_key_guards_every_route_but_health(tokenizer):
    with served(tokenizer, Guards(api_key=KEY)) as s:
        c, auth = s.client, {"Authorization": f"Bearer {KEY}"}
        assert c.get("/health").status_code == 200
        missing, wrong = c.get("/v1/models"), c.get("/v1/models", headers={
            "Authorization": "Bearer s3cret-kez"})
        for response in (missing, wrong, c.get("/metrics"),
                         c.post(CHAT, json={"model": NAME, "messages": HI})):
            assert response.status_code == 401
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert {k: error(response)[k] for k in ("type", "param", "code")} == {
                "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
        assert error(missing)["message"].startswith("You didn't provide an API key")
        assert error(wrong)["message"].startswith("Incorrect API key provided")
        assert c.get("/v1/models", headers=auth).json()["data"][0]["id"] == NAME
        assert c.get("/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
        assert c.get("/metrics", headers=auth).status_code == 200
        chat = c.post(CHAT, json={"model": NAME, "messages": HI}, headers=auth)
        assert chat.json()["choices"][0]["message"]["content"] == ANSWER
        for hidden in ("/openapi.json", "/docs", "/redoc"):
            assert c.get(hidden, headers=auth).status_code == 404
        assert count(s.metrics, "medqlora_requests_total", endpoint="/v1/models",
                     status="401") == 2
        assert count(s.metrics, "medqlora_request_errors_total", endpoint=CHAT,
                     type="invalid_request_error") == 1


def test_public_metrics_opens_metrics_only(tokenizer):
    with served(tokenizer, Guards(api_key=KEY, public_metrics=True)) as s:
        assert s.client.get("/metrics").status_code == 200
        assert s.client.get("/v1/models").status_code == 401


def test_without_a_key_the_routes_are_open_and_openapi_is_off(tokenizer):
    with served(tokenizer) as s:
        assert s.client.get("/v1/models").status_code == 200
        assert s.client.get("/metrics").status_code == 200
        assert s.client.get("/openapi.json").status_code == 404


def test_the_key_is_checked_before_the_body_is_read(tokenizer):
    with served(tokenizer, Guards(max_body_bytes=1000, api_key=KEY), started=False) as s:
        status, body, read = asgi_post(s.client.app, [b" " * 400] * 50)
        assert (status, body["error"]["code"], read) == (401, "invalid_api_key", 0)
        authorised = [(b"authorization", f"Bearer {KEY}".encode())]
        status, body, read = asgi_post(s.client.app, [b" " * 400] * 50, authorised)
        assert (status, body["error"]["code"], read) == (413, "request_too_large", 3)


def test_the_key_is_compared_in_constant_time(tokenizer, monkeypatch):
    from medqlora.ship.serve import guards
    calls, real = [], guards.hmac.compare_digest

    def compare_digest(a, b):
        calls.append((a, b))
        return real(a, b)
    monkeypatch.setattr(guards.hmac, "compare_digest", compare_digest)
    with served(tokenizer, Guards(api_key=KEY)) as s:
        assert s.client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code \
            == 401
    assert calls == [(b"nope", KEY.encode())]


@pytest.mark.parametrize("host, key, warns", [
    ("127.0.0.1", None, False), ("127.0.0.2", None, False), ("::1", None, False),
    ("localhost", None, False), ("0.0.0.0", None, True), ("::", None, True),
    ("10.1.2.3", None, True), ("models.example.org", None, True), ("0.0.0.0", KEY, False),
])
def test_a_public_bind_without_a_key_warns(host, key, warns):
    warnings = exposure_warnings(host, Guards(api_key=key))
    assert len(warnings) == int(warns)
    assert all(host in w and "MEDQLORA_API_KEY" in w for w in warnings)


def test_serve_logs_the_warning_at_startup(tokenizer, monkeypatch, caplog):
    started = {}
    monkeypatch.setattr(api, "load_package", lambda *a, **k: loaded(tokenizer))
    monkeypatch.setattr(api.uvicorn, "run", lambda app, **kw: started.update(kw))
    with caplog.at_level(logging.WARNING, logger=api.__name__):
        api.serve("pkg", host="0.0.0.0", port=8123)
    assert started["host"] == "0.0.0.0"
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == \
        exposure_warnings("0.0.0.0", Guards())


# ---------------------------------------------------------------- the serve flags

def test_serve_flags_and_their_defaults(monkeypatch):
    args = cli.build_parser().parse_args(["serve", "pkg"])
    assert (args.max_body_bytes, args.api_key, args.public_metrics) == (2**20, None, False)
    monkeypatch.setenv("MEDQLORA_API_KEY", KEY)
    assert cli.build_parser().parse_args(["serve", "pkg"]).api_key == KEY
    assert cli.build_parser().parse_args(["serve", "pkg", "--api-key", "k2"]).api_key == "k2"


@pytest.mark.parametrize("flags, env, problem", [
    (["--api-key", ""], None, "--api-key / MEDQLORA_API_KEY is empty"),
    ([], " ", "--api-key / MEDQLORA_API_KEY is empty"),
    (["--public-metrics"], None, "--public-metrics only makes sense with an API key"),
    (["--max-body-bytes", "0"], None, "--max-body-bytes: 0; give a positive number"),
])
def test_serve_refuses_flags_that_cannot_work(monkeypatch, capsys, flags, env, problem):
    monkeypatch.delenv("MEDQLORA_API_KEY", raising=False)
    if env is not None:
        monkeypatch.setenv("MEDQLORA_API_KEY", env)
    assert cli.main(["serve", "no-such-package", *flags]) == cli.EXIT_INVALID
    assert capsys.readouterr().err.startswith(f"serve: {problem}")
