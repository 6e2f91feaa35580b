"""Attention alone on one GPU: varlen vs sdpa on packed medical rows, and the per-shape cost.

    python bench/check_attention.py --out $OUT        # ~30 s on an H200

1. Parity: medqlora.train.fast.attention's varlen path (torch varlen_attn) against transformers' sdpa
   attention under the block-diagonal causal mask it builds for packed rows; Mistral-7B heads
   (32 query, 8 key/value, dim 128), bf16, 4 rows x 2048 of medical-length examples (the
   bench's lognormal, median 350). Forward and input gradients, max |diff| vs the scale.
2. Speed, forward + backward of one layer's attention on those rows: sdpa + dense mask (what
   packed rows got before), varlen, and sdpa causal over whole rows (no document mask).
3. The per-shape cost the train bench saw on variable-length micro-batches (~1 s a step):
   sdpa with cuDNN enabled, first call at each new sequence length vs a repeat of it, and the
   profiler's top CPU ops of a first call.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from medqlora.train.fast import attention

HEADS, KV, DIM, ROWS, SEQ = 32, 8, 128, 4, 2048


def medical_rows(seed: int = 0) -> list[list[int]]:
    """Example lengths packed best-fit into ROWS rows of at most SEQ tokens."""
    from bench.bench_train import lengths_for
    from medqlora.data.dataset import pack
    lengths = lengths_for("medical", 64, SEQ, seed)
    rows = pack([{"input_ids": [0] * n, "labels": [0] * n, "length": n, "id": f"{i:04d}"}
                 for i, n in enumerate(lengths)], SEQ)
    return [r["seq_lens"] + ([SEQ - sum(r["seq_lens"])] if sum(r["seq_lens"]) < SEQ else [])
            for r in rows[:ROWS]]


def inputs(docs: list[list[int]], grad: bool = True):
    gen = torch.Generator(device="cuda").manual_seed(0)
    make = lambda h: torch.randn(ROWS, h, SEQ, DIM, device="cuda", dtype=torch.bfloat16,  # noqa: E731
                                 generator=gen).requires_grad_(grad)
    positions = torch.tensor([[p for n in row for p in range(n)] for row in docs], device="cuda")
    return make(HEADS), make(KV), make(KV), positions


def dense_mask(positions: torch.Tensor) -> torch.Tensor:
    doc = (torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1) != 1).cumsum(-1)
    idx = torch.arange(SEQ, device="cuda")
    causal = idx[:, None] >= idx[None, :]
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def timed(fn, repeat: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-results"))
    args = parser.parse_args()
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=HEADS // KV, training=True)
    docs = medical_rows()
    q, k, v, positions = inputs(docs)
    kw = attention.document_boundaries(positions.cpu())
    mask = dense_mask(positions)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "kernel": attention.kernel_name("cuda"), "docs": docs}

    # 1. parity
    def run(fn):
        for t in (q, k, v):
            t.grad = None
        out = fn()
        out.float().pow(2).sum().backward()
        return out.detach().float(), [t.grad.float() for t in (q, k, v)]
    ref, ref_g = run(lambda: sdpa(module, q, k, v, mask, scaling=DIM ** -0.5)[0])
    var, var_g = run(lambda: attention.varlen_attention_forward(
        module, q, k, v, None, scaling=DIM ** -0.5, **kw)[0])
    report["parity"] = {"out_max_abs_diff": (var - ref).abs().max().item(),
                        "out_max_abs": ref.abs().max().item(),
                        "grad_max_abs_diff": [(a - b).abs().max().item() for a, b in zip(var_g, ref_g)],
                        "grad_max_abs": [g.abs().max().item() for g in ref_g]}
    print(json.dumps(report["parity"]), flush=True)

    # 2. speed, forward + backward
    def step(fn):
        return lambda: fn().float().sum().backward()
    report["ms_fwd_bwd"] = {
        "sdpa + block-diagonal mask": timed(step(lambda: sdpa(module, q, k, v, mask)[0])),
        "varlen": timed(step(lambda: attention.varlen_attention_forward(
            module, q, k, v, None, **kw)[0])),
        "sdpa causal, whole rows (no document mask)": timed(step(lambda: sdpa(
            module, q, k, v, None)[0])),
    }
    pairs = sum(n * n for row in docs for n in row)
    report["score_pairs_share_of_whole_rows"] = pairs / (ROWS * SEQ * SEQ)
    print(json.dumps(report["ms_fwd_bwd"]), flush=True)

    # 3. per-shape cost of sdpa with cuDNN on (variable-length micro-batches)
    torch.backends.cuda.enable_cudnn_sdp(True)
    shape_ms = []
    for seq in (1664, 1792, 1920, 1856, 1728, 2000):
        qs = torch.randn(1, HEADS, seq, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        ks = torch.randn(1, HEADS, seq, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        vs = torch.randn(1, HEADS, seq, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        call = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            qs, ks, vs, is_causal=True).float().sum().backward()
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        first = (time.perf_counter() - start) * 1e3
        shape_ms.append({"seq": seq, "first_call_ms": first, "repeat_ms": timed(call, 5)})
    report["cudnn_sdpa_new_shape"] = shape_ms
    print(json.dumps(shape_ms), flush=True)
    from torch.profiler import ProfilerActivity, profile
    qs = torch.randn(1, HEADS, 1600, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.nn.functional.scaled_dot_product_attention(qs, qs, qs, is_causal=True).sum().backward()
        torch.cuda.synchronize()
    top = prof.key_averages().table(sort_by="cpu_time_total", row_limit=12)
    report["profile_first_call_top_cpu"] = top
    print(top, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "check_attention.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
