"""`medqlora serve` on the tiny package, driven by the official `openai` client: plain,
streaming and concurrent requests answer exactly as `medqlora generate` does at greedy decoding;
bad requests get OpenAI error bodies; /metrics is Prometheus text that counts what was sent.
Issue 27 on the real server: a 20 MB body is refused while /health keeps answering and the
memory does not grow, long prompts are tokenised off the event loop, an abandoned stream is
counted, the API key. (tests/test_serving_http.py tests the HTTP layer without a model.)"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ROOT, run
from package_fixture import NAME, QUESTIONS, tiny_package  # noqa: F401  (fixture)
from test_container import engine  # noqa: F401  (fixture: the Docker engine and project image)

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Served:
    """A `medqlora serve` process on 127.0.0.1; stopped (SIGINT, then kill) at the end."""

    def __init__(self, args: list[str], cwd: Path, log: Path, timeout: float = 180,
                 env: dict[str, str] | None = None, api_key: str = "unused"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log, self.api_key = log, api_key
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "medqlora.cli", "serve", *args, "--port", str(self.port)],
            cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise AssertionError(f"serve did not answer /health in {timeout} s:\n{log.read_text()}")

    def client(self):
        import openai
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key, max_retries=0,
                             timeout=120)

    def metrics(self) -> dict[tuple, float]:
        """{(sample name, sorted labels): value}, parsed by prometheus_client's own parser."""
        from prometheus_client.parser import text_string_to_metric_families
        request = urllib.request.Request(f"{self.url}/metrics", headers={
            "Authorization": f"Bearer {self.api_key}"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=")
            text = resp.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def package(tiny_package) -> Path:
    return tiny_package


@pytest.fixture(scope="module")
def expected(package) -> list[str]:
    """`medqlora generate`'s answers (one line each) to QUESTIONS."""
    questions = package.parent / "serve-questions.jsonl"
    questions.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    out = run([sys.executable, "-m", "medqlora.cli", "generate", "--package", str(package),
               "--file", str(questions)], ROOT).stdout.splitlines()
    assert len(out) == len(QUESTIONS) and all(out), out
    return out


@pytest.fixture(scope="module")
def server(package, tmp_path_factory):
    served = Served([str(package), "--max-batch-size", "4"], ROOT,
                    tmp_path_factory.mktemp("serve-log") / "serve.log")
    yield served
    served.stop()


def chat(client, question: str, model: str = NAME, **kwargs):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], **kwargs)


def test_models_and_health(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [NAME]
    with urllib.request.urlopen(f"{server.url}/health") as resp:
        assert json.load(resp) == {"status": "ok", "model": NAME}


def test_chat_answers_equal_generate(server, expected):
    client = server.client()
    for question, answer in zip(QUESTIONS, expected):
        reply = chat(client, question)
        assert reply.choices[0].message.content == answer, question
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 5


def test_streaming_adds_up_to_the_same_answer(server, expected):
    client = server.client()
    for question, answer in zip(QUESTIONS[:3], expected):
        chunks = list(chat(client, question, stream=True,
                           stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == answer
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2
        assert chunks[-2].choices[0].finish_reason in ("stop", "length")
        assert chunks[-1].usage.completion_tokens > 0      # the usage chunk comes last


def test_stop_strings_cut_the_answer(server, expected):
    client = server.client()
    answer = expected[0]
    stop = answer.split()[1]                  # a word inside the greedy answer
    want = answer[:answer.index(stop)].strip()
    reply = chat(client, QUESTIONS[0], stop=[stop])
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (want, "stop")
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(
        client, QUESTIONS[0], stop=stop, stream=True) if c.choices)
    assert streamed == want


def test_concurrent_requests_are_batched_and_equal(server, expected):
    client = server.client()
    before = server.metrics()
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        replies = list(pool.map(lambda q: chat(client, q), QUESTIONS))
    assert [r.choices[0].message.content for r in replies] == expected
    after = server.metrics()
    steps, alone = ((after[key] - before[key]) for key in (
        ("medqlora_batch_size_count", ()), ("medqlora_batch_size_bucket", (("le", "1.0"),))))
    assert steps > 0 and alone < steps    # some decode steps ran several requests together


def test_completions_endpoint_takes_the_raw_prompt(server, expected, package):
    from transformers import AutoTokenizer
    from medqlora.data.templates import format_prompt
    tokenizer = AutoTokenizer.from_pretrained(str(package))
    client = server.client()
    prompt = format_prompt(tokenizer, QUESTIONS[0])
    reply = client.completions.create(model=NAME, prompt=prompt)
    assert reply.choices[0].text == expected[0]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt=prompt, stream=True) if c.choices)
    assert streamed == expected[0]


def test_bad_requests_get_openai_errors(server):
    import openai
    client = server.client()
    cases = [
        (openai.NotFoundError, dict(model="gpt-4o"), "does not exist"),
        (openai.BadRequestError, dict(temperature=5), "temperature"),
        (openai.BadRequestError, dict(n=2), "n: only n=1"),
        (openai.BadRequestError, dict(max_tokens=5000), "maximum context length"),
        (openai.BadRequestError, dict(seed=2**32), "seed: Input should be less than 4294967296"),
        (openai.BadRequestError, dict(seed=-1), "seed: Input should be greater than or equal"),
    ]
    for error, kwargs, text in cases:
        with pytest.raises(error) as caught:
            chat(client, "What is anaemia?", **kwargs)
        body = caught.value.body
        assert text in body["message"] and body["type"], body
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=NAME, messages=[
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    assert "last message must be a user message" in caught.value.body["message"]
    # Not JSON at all: still an OpenAI error body, never a traceback.
    request = urllib.request.Request(f"{server.url}/v1/chat/completions", data=b"{not json",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request)
    assert caught.value.code == 400
    body = json.loads(caught.value.read())
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] is None
    assert body["error"]["message"] == ("body: invalid JSON at line 1 column 2 (Expecting "
                                        "property name enclosed in double quotes)")
    assert "Traceback" not in server.log.read_text()


def test_lone_surrogates_are_400s_naming_the_field(server):
    """The tokenizer cannot take a lone surrogate (a JSON \\ud800 escape): named, not a 500."""
    cases = [("/v1/chat/completions", {"model": NAME, "messages": [
                 {"role": "user", "content": "What is \ud800anaemia?"}]}, "messages[0].content"),
             ("/v1/completions", {"model": NAME, "prompt": ["ok", "\udc00"]}, "prompt[1]")]
    for path, body, param in cases:
        status, answer = post_raw(server, path, json.dumps(body).encode())
        assert (status, answer["error"]["param"]) == (400, param), answer
    assert chat(server.client(), QUESTIONS[0]).choices[0].message.content
    assert "Traceback" not in server.log.read_text()


def post_raw(server, path: str, body, headers: dict | None = None) -> tuple[int, dict]:
    """POST bytes (or an iterable of chunks: sent chunked) with http.client; status and JSON."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json",
                                                       **(headers or {})})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS in /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("VmRSS:"))) * 1024


def health_while(server, busy) -> float:
    """Poll /health every 0.1 s until `busy` (a Future) is done: the slowest answer, s."""
    slowest = 0.0
    while not busy.done():
        start = time.perf_counter()
        with urllib.request.urlopen(f"{server.url}/health", timeout=30) as resp:
            assert resp.status == 200
        slowest = max(slowest, time.perf_counter() - start)
        time.sleep(0.1)
    return slowest


def test_a_20_mb_body_is_refused_while_health_answers(server):
    """Issue 27: 20 MB took 29 s to refuse, blocked /health as long and left RSS 1.5 GB up.
    Now 413 (the default --max-body-bytes, 1 MiB), declared or chunked."""
    prompt = json.dumps({"model": NAME, "prompt": "anaemia " * 2_500_000}).encode()  # 20 MB
    rss_before = rss_bytes(server.proc.pid)
    uploads = {"declared": prompt,
               "chunked": (prompt[i:i + 2**20] for i in range(0, len(prompt), 2**20))}
    with ThreadPoolExecutor(1) as pool:
        for how, body in uploads.items():
            start = time.perf_counter()
            refused = pool.submit(post_raw, server, "/v1/completions", body)
            slowest = health_while(server, refused)
            status, answer = refused.result()
            seconds = time.perf_counter() - start
            assert (status, answer["error"]["code"]) == (413, "request_too_large"), how
            assert seconds < 10 and slowest < 1.0, (how, seconds, slowest)
    grown = rss_bytes(server.proc.pid) - rss_before
    assert grown < 64 * 2**20, f"RSS grew {grown / 2**20:.0f} MiB"
    assert chat(server.client(), QUESTIONS[0]).choices[0].message.content


def test_a_long_prompt_is_tokenised_off_the_event_loop(package, tmp_path):
    """A 6 MB prompt, accepted under --max-body-bytes 8 MiB, tokenises for seconds (~1.6M
    tokens); /health answers meanwhile, and then the prompt gets context_length_exceeded."""
    served = Served([str(package), "--max-body-bytes", str(8 * 2**20)], ROOT,
                    tmp_path / "serve.log")
    try:
        body = json.dumps({"model": NAME, "prompt": "anaemia " * 750_000}).encode()
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(post_raw, served, "/v1/completions", body)
            slowest = health_while(served, answer)
        status, error = answer.result()
        assert (status, error["error"]["code"]) == (400, "context_length_exceeded")
        assert slowest < 1.0, slowest
    finally:
        served.stop()


def test_an_abandoned_stream_is_counted_as_499(server):
    """A client that leaves mid-stream is counted (status 499), not missing from the metrics."""
    before = server.metrics()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({
        "model": NAME, "stream": True, "messages": [{"role": "user", "content": QUESTIONS[1]}]}),
        headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    conn.close()      # gone after the headers, before the first token
    key = ("medqlora_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "499")))
    depth = ("medqlora_queue_depth", ())
    deadline = time.monotonic() + 10
    after = server.metrics()
    # The count comes when the server sees the disconnect; the queue empties when the worker
    # takes the cancelled job (and drops it at its first step).
    while (after.get(key, 0) == before.get(key, 0) or after[depth]) and \
            time.monotonic() < deadline:
        time.sleep(0.1)
        after = server.metrics()
    assert after.get(key, 0) - before.get(key, 0) == 1
    done = ("medqlora_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))
    assert after.get(done, 0) == before.get(done, 0)
    assert after[depth] == 0


def test_metrics_count_what_was_sent(server):
    client = server.client()
    before = server.metrics()
    replies = [chat(client, q, max_tokens=6) for q in QUESTIONS[:3]]
    with pytest.raises(Exception):
        chat(client, "x", model="nope")
    after = server.metrics()

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    endpoint = "/v1/chat/completions"
    assert delta("medqlora_requests_total", endpoint=endpoint, status="200") == 3
    assert delta("medqlora_requests_total", endpoint=endpoint, status="404") == 1
    assert delta("medqlora_request_errors_total", endpoint=endpoint,
                 type="invalid_request_error") == 1
    assert delta("medqlora_request_latency_seconds_count", endpoint=endpoint) == 4
    assert delta("medqlora_time_to_first_token_seconds_count") == 3
    assert delta("medqlora_generated_tokens_total") == sum(
        r.usage.completion_tokens for r in replies)
    assert delta("medqlora_prompt_tokens_total") == sum(r.usage.prompt_tokens for r in replies)
    assert delta("medqlora_generation_tokens_per_second_count") == 3
    assert after[("medqlora_queue_depth", ())] == 0


def test_serve_refuses_a_package_that_fails_verify(package, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(package, bad)
    (bad / "generation_config.json").write_text("{}")
    proc = run([sys.executable, "-m", "medqlora.cli", "serve", str(bad)], ROOT, check=False)
    assert proc.returncode == 1
    assert "altered: generation_config.json" in proc.stderr and "refusing" in proc.stderr


def test_an_api_key_from_the_environment_guards_the_server(package, expected, tmp_path):
    """MEDQLORA_API_KEY: the openai client with the key is answered, without it 401
    invalid_api_key; /health stays open (Served waits on it), /metrics needs the key."""
    import openai
    key = "test-key-27"
    served = Served([str(package)], ROOT, tmp_path / "serve.log",
                    env={"MEDQLORA_API_KEY": key}, api_key=key)
    try:
        assert chat(served.client(), QUESTIONS[0]).choices[0].message.content == expected[0]
        assert served.metrics()[("medqlora_requests_total", (
            ("endpoint", "/v1/chat/completions"), ("status", "200")))] == 1
        served.api_key = "wrong"
        with pytest.raises(openai.AuthenticationError) as caught:
            chat(served.client(), QUESTIONS[0])
        assert caught.value.body["code"] == "invalid_api_key"
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"{served.url}/metrics")
        assert caught.value.code == 401
        assert "without an API key" not in served.log.read_text()
    finally:
        served.stop()


def test_serve_pulls_a_tagged_package_through_dvc(tiny_package, expected, tmp_path):
    """`medqlora serve --repo --rev --artifact` in an empty folder: dvc artifacts get (and the
    base beside it), verify, serve; the answer is the package's."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_package, repo / "artifacts/package")
    shutil.copytree(ROOT / "models/tiny-med-llama", repo / "models/tiny-med-llama")
    (repo / "dvc.yaml").write_text(
        f"artifacts:\n  {NAME}:\n    path: artifacts/package\n    type: model\n")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "add", "artifacts/package"],
                ["git", "add", "-A"], [*git, "commit", "-qm", "v1"], ["git", "tag", "v1.0.0"],
                [*git, "tag", "-a", f"{NAME}@v1.0.0", "-m", "v1.0.0"]):
        run(cmd, repo)
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    served = Served(["--repo", str(repo), "--rev", "v1.0.0", "--artifact", NAME], deploy,
                    tmp_path / "serve.log")
    try:
        assert (deploy / "artifacts/package/manifest.json").read_bytes() == \
            (tiny_package / "manifest.json").read_bytes()
        assert (deploy / "models/tiny-med-llama/config.json").is_file()
        assert chat(served.client(), QUESTIONS[0]).choices[0].message.content == expected[0]
    finally:
        served.stop()


# A client inside the container (its network is "none"): wait for /health, ask one question.
IN_CONTAINER_CLIENT = """
import json, sys, time, urllib.request as u
for _ in range(600):
    try:
        u.urlopen("http://127.0.0.1:8000/health", timeout=2)
        break
    except OSError:
        time.sleep(0.5)
body = {"model": sys.argv[1], "messages": [{"role": "user", "content": sys.argv[2]}]}
req = u.Request("http://127.0.0.1:8000/v1/chat/completions", data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"})
print(json.load(u.urlopen(req, timeout=300))["choices"][0]["message"]["content"])
"""


@pytest.mark.docker
def test_project_image_serves_the_package(engine, tiny_package, expected, tmp_path):  # noqa: F811
    """`medqlora serve` in the project image (containers/Dockerfile), as a deployment runs it."""
    client, tag = engine
    ws = tmp_path / "ws"
    shutil.copytree(tiny_package, ws / "artifacts/package")
    shutil.copytree(ROOT / "models/tiny-med-llama", ws / "models/tiny-med-llama")
    container = client.containers.run(
        tag, ["medqlora", "serve", "artifacts/package", "--port", "8000"], detach=True,
        network_mode="none", working_dir=str(ws), user=f"{os.getuid()}:{os.getgid()}",
        environment={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
        volumes={str(ws): {"bind": str(ws), "mode": "rw"},
                 str(ROOT): {"bind": str(ROOT), "mode": "ro"}})
    try:
        code, out = container.exec_run(["python", "-c", IN_CONTAINER_CLIENT, NAME, QUESTIONS[0]])
        logs = container.logs().decode(errors="replace")
        assert code == 0, f"{out.decode(errors='replace')}\n--- serve log\n{logs[-3000:]}"
        assert out.decode().strip() == expected[0]
        assert "Traceback" not in logs
    finally:
        container.remove(force=True)
