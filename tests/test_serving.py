"""`medqlora serve` on the tiny package, driven by the official `openai` client: plain,
streaming and concurrent requests answer exactly as `medqlora generate` does at greedy decoding;
bad requests get OpenAI error bodies; /metrics is Prometheus text that counts what was sent."""
from __future__ import annotations

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

    def __init__(self, args: list[str], cwd: Path, log: Path, timeout: float = 180):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               "PYTHONPATH": str(ROOT)}
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
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0,
                             timeout=120)

    def metrics(self) -> dict[tuple, float]:
        """{(sample name, sorted labels): value}, parsed by prometheus_client's own parser."""
        from prometheus_client.parser import text_string_to_metric_families
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as resp:
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
    batches = after[("medqlora_batch_size_count", ())] - before[("medqlora_batch_size_count", ())]
    assert batches < len(QUESTIONS)       # some requests shared a model.generate call


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
    assert "Traceback" not in server.log.read_text()


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
