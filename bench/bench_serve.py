"""Throughput and latency of `medqlora serve` on a package: N concurrent streaming clients.

    python bench/bench_serve.py artifacts/package                       # 1, 16 and 64 clients
    python bench/bench_serve.py artifacts/package --clients 1 4 --requests 8 --max-tokens 16
    python bench/bench_serve.py artifacts/package --card "NVIDIA H100 80GB" --out $OUT

Starts `python -m medqlora.cli serve PACKAGE` on 127.0.0.1 (verify first, as in production),
waits for /health, sends one warm-up request, then for each client count C runs C threads that
each send chat completions back to back (streaming, so every chunk is timed at the client)
until --requests answers came back. Greedy decoding unless the package samples. Clients use
only the standard library (http.client), so the machine needs the server's wheels only.

Columns (each client count is one row):
- requests/s = answers / wall time; tokens/s = completion tokens (the server's usage count) /
  wall time, the same wall time (first request sent to last answer read).
- TTFT = time to first token: sending the request to reading its first content chunk.
- ITL = inter-token latency: the gaps between consecutive content chunks of one answer, read at
  the client; the gaps of all answers of the row are pooled before taking percentiles. An
  answer of n content chunks gives n - 1 gaps. A chunk may carry more than one token: the
  server holds text back while it ends in a partial UTF-8 character or a prefix of a stop
  string and sends it in one chunk later, so ITL is per chunk, not strictly per token.
- p50/p90/p99 are nearest-rank percentiles (`percentile`): always a measured value, so p99 of
  fewer than 100 values is the largest one.
- latency p50 = the whole answer; mean tokens = completion tokens per answer (answers stop at
  eos, so this is measured, not set).

The card is --card when given, else the `device` field of /health if the server reports one,
else this machine's first CUDA device (or its CPU): the server runs here, on 127.0.0.1.
Prints the table and writes it to --out as table.md and results.json (rows + settings).
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import importlib.metadata
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

QUESTIONS = [
    "What is the first-line treatment of essential hypertension in adults?",
    "Explain the difference between type 1 and type 2 diabetes.",
    "What does an elevated TSH with a low free T4 indicate?",
    "List the common adverse effects of metformin.",
    "How is iron deficiency anaemia diagnosed?",
    "What are the warning signs of sepsis?",
    "Describe the mechanism of action of ACE inhibitors.",
    "When is a chest X-ray indicated in community-acquired pneumonia?",
]
PERCENTILES = (50, 90, 99)
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes")


def percentile(values, q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q% of `values` at or below it,
    i.e. sorted(values)[ceil(q / 100 * n) - 1] (q = 0 gives the minimum). No interpolation."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(package: str, port: int, args, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "medqlora.cli", "serve", package, "--port", str(port),
           "--max-batch-size", str(args.max_batch_size)] + (["--merged"] if args.merged else [])
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + args.load_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"serve exited {proc.returncode}; log:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    sys.exit(f"serve did not answer /health within {args.load_timeout} s")


def get_json(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return json.load(resp)


def local_device() -> str:
    """This machine's first CUDA device, else its CPU (model name and cores this process may
    use): the server runs on this machine."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")]
        name = models[0] if models else name
    return f"CPU {name}, {len(os.sched_getaffinity(0))} cores"


def one_request(port: int, model: str, question: str, max_tokens: int) -> dict:
    """A streaming chat completion, timed at the client: ttft, latency (seconds from sending),
    chunks (the time of each content chunk, seconds from sending), completion tokens."""
    body = json.dumps({"model": model, "stream": True, "max_tokens": max_tokens,
                       "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": question}]})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
    chunks, tokens = [], 0
    for raw in resp:
        now = time.perf_counter() - start     # before parsing: parsing is client time
        line = raw.decode("utf-8").strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise RuntimeError(f"the stream ended in an error: {chunk['error']}")
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            chunks.append(now)
    latency = time.perf_counter() - start
    conn.close()
    return {"ttft": chunks[0] if chunks else latency, "latency": latency, "chunks": chunks,
            "tokens": tokens}


def summarise(answers: list[dict], clients: int, wall: float) -> dict:
    """One row from the answers of one client count (dicts as `one_request` returns)."""
    tokens = sum(a["tokens"] for a in answers)
    ttfts = [a["ttft"] for a in answers]
    # ITL: every gap between consecutive content chunks of one answer, all answers pooled.
    gaps = [later - earlier for a in answers
            for earlier, later in zip(a["chunks"], a["chunks"][1:])]
    row = {"clients": clients, "requests": len(answers), "wall_s": wall,
           "requests_per_s": len(answers) / wall, "gen_tokens_per_s": tokens / wall}
    for q in PERCENTILES:
        row[f"ttft_p{q}_s"] = percentile(ttfts, q)
    for q in PERCENTILES:
        row[f"itl_p{q}_s"] = percentile(gaps, q) if gaps else None   # one-chunk answers only
    row.update({"itl_gaps": len(gaps),
                "latency_p50_s": percentile([a["latency"] for a in answers], 50),
                "mean_tokens": tokens / len(answers),
                "mean_chunks": statistics.fmean(len(a["chunks"]) for a in answers)})
    return row


def run_level(port: int, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` threads sending back to back until `requests` answers came back."""
    answers, failures, lock, counter = [], [], threading.Lock(), iter(range(requests))

    def worker(index: int) -> None:
        while True:
            with lock:
                n = next(counter, None)
            if n is None or failures:
                return
            try:
                out = one_request(port, model, QUESTIONS[(n + index) % len(QUESTIONS)],
                                  max_tokens)
            except (OSError, RuntimeError, ValueError) as err:   # kept, raised after the join
                with lock:
                    failures.append(err)
                return
            with lock:
                answers.append(out)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{len(failures)} request(s) failed at {clients} clients; first: "
                           f"{failures[0]!r}")
    return summarise(answers, clients, wall)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f}"


def table(rows: list[dict]) -> str:
    """The rows as a markdown table; TTFT and ITL in milliseconds."""
    ttft = " | ".join(f"TTFT p{q} ms" for q in PERCENTILES)
    itl = " | ".join(f"ITL p{q} ms" for q in PERCENTILES)
    lines = [f"| clients | requests | requests/s | tokens/s | {ttft} | {itl} | latency p50 s "
             "| mean tokens |", "|---" * (6 + 2 * len(PERCENTILES)) + "|"]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | "
            f"{r['gen_tokens_per_s']:.1f} | "
            + " | ".join(_ms(r[f"ttft_p{q}_s"]) for q in PERCENTILES) + " | "
            + " | ".join(_ms(r[f"itl_p{q}_s"]) for q in PERCENTILES)
            + f" | {r['latency_p50_s']:.2f} | {r['mean_tokens']:.1f} |")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    """The server's libraries as installed for this interpreter (the server runs with it)."""
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", help="package folder (verified by serve)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--requests", type=int, default=None,
                        help="answers per client count (default: max(8, 4 x clients))")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--merged", action="store_true", help="serve merged/ (bf16, no 4-bit)")
    parser.add_argument("--load-timeout", type=float, default=900)
    parser.add_argument("--card", help="the server's device, as the table names it (default: "
                        "/health's device, else this machine's GPU or CPU)")
    parser.add_argument("--out", default="bench/results/serve",
                        help="folder for table.md and results.json")
    parser.add_argument("--json", help="also write the rows alone to this JSON file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    port = free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_serve_{port}.log"
    t0 = time.perf_counter()
    proc = start_server(args.package, port, args, log_path)
    startup = time.perf_counter() - t0
    print(f"server up in {startup:.0f} s (log {log_path})", flush=True)
    rows = []
    try:
        card = args.card or get_json(port, "/health").get("device") or local_device()
        model = get_json(port, "/v1/models")["data"][0]["id"]
        one_request(port, model, QUESTIONS[0], 8)   # warm-up: kernels, caches
        for clients in args.clients:
            requests = args.requests or max(8, 4 * clients)
            rows.append(run_level(port, model, clients, requests, args.max_tokens))
            print(f"  {clients} client(s): {rows[-1]['requests_per_s']:.2f} req/s, "
                  f"{rows[-1]['gen_tokens_per_s']:.1f} tokens/s", flush=True)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            batches = [line for line in resp.read().decode().splitlines()
                       if line.startswith("medqlora_batch_size_")
                       and ("_count" in line or "_sum" in line)]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    libs = versions()
    mode = "merged" if args.merged else "4-bit + adapter"
    head = (f"{model} on {card}; {mode}; max_tokens {args.max_tokens}, max batch "
            f"{args.max_batch_size}; " + ", ".join(f"{k} {v}" for k, v in libs.items())
            + f"; {datetime.date.today()}; server up in {startup:.0f} s")
    report = (f"{head}\n\n{table(rows)}\n\nTTFT and ITL at the client, nearest-rank "
              "percentiles; ITL pools the gaps between consecutive content chunks of each "
              f"answer.\nserver batches (/metrics): {'; '.join(batches)}\n")
    print("\n" + report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(report)
    settings = {k: getattr(args, k) for k in ("package", "clients", "requests", "max_tokens",
                                              "max_batch_size", "merged")}
    (out / "results.json").write_text(json.dumps(
        {"model": model, "card": card, "date": str(datetime.date.today()), "libraries": libs,
         "settings": settings, "startup_s": startup, "server_batches": batches, "rows": rows},
        indent=2) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {out / 'table.md'} and {out / 'results.json'}")


if __name__ == "__main__":
    main()
