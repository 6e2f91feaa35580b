"""Throughput of `medqlora serve` on a package: N concurrent streaming clients, one table.

    python bench/bench_serve.py artifacts/package --clients 1 16
    python bench/bench_serve.py artifacts/package --clients 1 4 16 --requests 64 --max-tokens 128

Starts `python -m medqlora.cli serve PACKAGE` on 127.0.0.1 (verify first, as in production),
waits for /health, sends one warm-up request, then for each client count C runs C threads that
each send chat completions back to back (streaming, so time to first token is measured at the
client) until --requests answers came back. Greedy decoding unless the package samples. Clients
use only the standard library (http.client), so the machine needs the server's wheels only.

Columns: requests/s = answers / wall time; gen tokens/s = completion tokens (the server's usage
count) / wall time; TTFT p50/p90 = first content chunk after sending; latency p50 = whole
answer; mean tokens = completion tokens per answer (answers stop at eos, so this is measured,
not set). The server batches up to --max-batch-size requests per model.generate (default 16).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
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


def model_name(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as resp:
        return json.load(resp)["data"][0]["id"]


def one_request(port: int, model: str, question: str, max_tokens: int) -> dict:
    """A streaming chat completion; (ttft, latency, completion tokens) at the client."""
    body = json.dumps({"model": model, "stream": True, "max_tokens": max_tokens,
                       "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": question}]})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
    ttft, tokens = None, 0
    for raw in resp:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            ttft = time.perf_counter() - start
    latency = time.perf_counter() - start
    conn.close()
    return {"ttft": ttft if ttft is not None else latency, "latency": latency, "tokens": tokens}


def run_level(port: int, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` threads sending back to back until `requests` answers came back."""
    results, lock, counter = [], threading.Lock(), iter(range(requests))

    def worker(index: int) -> None:
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            out = one_request(port, model, QUESTIONS[(n + index) % len(QUESTIONS)], max_tokens)
            with lock:
                results.append(out)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "wall_s": wall,
            "requests_per_s": len(results) / wall, "gen_tokens_per_s": tokens / wall,
            "ttft_p50_s": statistics.median(ttfts),
            "ttft_p90_s": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
            "latency_p50_s": statistics.median(r["latency"] for r in results),
            "mean_tokens": tokens / len(results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", help="package folder (verified by serve)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests", type=int, default=None,
                        help="answers per level (default: max(8, 4 x clients))")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--merged", action="store_true", help="serve merged/ (bf16, no 4-bit)")
    parser.add_argument("--load-timeout", type=float, default=900)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    port = free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_serve_{port}.log"
    t0 = time.perf_counter()
    proc = start_server(args.package, port, args, log_path)
    print(f"server up in {time.perf_counter() - t0:.0f} s (log {log_path})", flush=True)
    rows = []
    try:
        model = model_name(port)
        one_request(port, model, QUESTIONS[0], 8)   # warm-up: kernels, caches
        for clients in args.clients:
            requests = args.requests or max(8, 4 * clients)
            rows.append(run_level(port, model, clients, requests, args.max_tokens))
            print(f"  {clients} client(s): {rows[-1]['requests_per_s']:.2f} req/s", flush=True)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            batches = [line for line in resp.read().decode().splitlines()
                       if line.startswith("medqlora_batch_size_")]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    device = "cpu"
    try:
        import torch
        if torch.cuda.is_available():
            device = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    print(f"\n{model} on {device}, max_tokens {args.max_tokens}, "
          f"max batch {args.max_batch_size}{', merged' if args.merged else ', 4-bit + adapter'}")
    print("| clients | requests | requests/s | gen tokens/s | TTFT p50 s | TTFT p90 s "
          "| latency p50 s | mean tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | "
              f"{r['gen_tokens_per_s']:.1f} | {r['ttft_p50_s']:.3f} | {r['ttft_p90_s']:.3f} | "
              f"{r['latency_p50_s']:.2f} | {r['mean_tokens']:.1f} |")
    print("\nserver batches (/metrics):", "; ".join(b for b in batches if "_count" in b
                                                  or "_sum" in b))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
