"""What one un-recomputed decoder layer keeps for backward, and the replayed LoRA dropout on a GPU.

    python bench/check_activations.py --out $OUT        # ~1 min on an H200
    python bench/check_activations.py --arch tiny --seq 64  # the driver on a CPU, seconds

A 2-layer Mistral-7B (random NF4 weights, bench_train.build_base) through the train stage's own
fast path (every switch on, checkpoint_policy none), LoRA r=64 on 7 projections, dropout 0.05,
one forward + backward in bf16 autocast on 1 x 2048 and 4 x 2048 tokens:
1. Saved-tensor bytes per decoder layer (distinct storages autograd keeps, counted by
   saved_tensors_hooks), with fused_lora's replayed dropout (and down_proj's input rebuilt
   from gate and up) and with peft's dropout in the same fused branch (dropout_mode "peft"),
   against medqlora.core.memory.layer_activation_bytes, the model the checkpoint budget plans with.
2. Exactness: from the same generator state both compute the loss and every adapter gradient;
   the max |difference| (0 when the replay draws peft's masks bit for bit).
3. Forward + backward time of each (2 layers; a relative figure only).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_train import FAST, build_base, medqlora_path  # noqa: E402
from medqlora.core import memory
from medqlora.train.fast import lora_branch

LAYERS, DROPOUT = 2, 0.05
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
sync = torch.cuda.synchronize if CUDA else (lambda: None)


class LayerBytes:
    """saved_tensors_hooks that bucket the distinct storages saved inside each decoder layer."""

    def __init__(self, layers):
        self.current, self.buckets, self.handles = None, [dict() for _ in layers], []
        for index, layer in enumerate(layers):
            self.handles += [
                layer.register_forward_pre_hook(lambda m, a, i=index: setattr(self, "current", i)),
                layer.register_forward_hook(lambda m, a, o: setattr(self, "current", None))]

    def remove(self) -> None:
        """Take the layer hooks off again (the next variant counts with its own)."""
        for handle in self.handles:
            handle.remove()

    def pack(self, tensor):
        if self.current is not None:
            storage = tensor.untyped_storage()
            self.buckets[self.current][storage.data_ptr()] = storage.nbytes()
        return tensor

    def per_layer(self) -> list[int]:
        return [sum(bucket.values()) for bucket in self.buckets]


def step(model, batch, seed: int, counter: LayerBytes | None = None):
    """One forward + backward from generator state `seed`: loss, adapter grads, seconds."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    sync()
    start = time.perf_counter()
    hooks = torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t) if counter \
        else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    with hooks, torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    sync()
    seconds = time.perf_counter() - start
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach().float().item(), grads, seconds


def measure(arch_name: str, rows: int, seq: int) -> dict:
    spec = dict(seq=seq, dropout=DROPOUT, warmup=0, steps=1,
                fast={**FAST, "checkpoint_policy": "none", "micro_batch_tokens": rows * seq})
    base = build_base(arch_name, LAYERS)
    model, collator, _ = medqlora_path(spec, base, "/tmp/check-activations", None)
    model.train()
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (rows, seq), generator=gen)
    rows = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]
    batch = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in collator(rows).items()}
    step(model, batch, 0)                              # warm-up: kernels compiled, caches made
    out = {"arch": arch_name, "device": torch.cuda.get_device_name() if CUDA else "cpu",
           "rows": rows, "tokens": rows * seq}
    arch = memory.Arch.from_config(model.config.to_dict())
    for name, mode in (("replayed", "replay"), ("peft dropout", "peft")):
        lora_branch.set_dropout_mode(model, mode)
        counter = LayerBytes(layers)
        loss, grads, _ = step(model, batch, 1234, counter)
        counter.remove()
        times = [step(model, batch, 1234)[2] for _ in range(3)]
        out[name] = {"loss": loss, "grads": grads, "seconds": min(times),
                     "saved_gib_per_layer": [b / 2**30 for b in counter.per_layer()],
                     "model_gib": memory.layer_activation_bytes(
                         arch, rows * seq, dropout_copies=name != "replayed",
                         swiglu_recomputed=name == "replayed") / 2**30}
    replayed, plain = out["replayed"], out["peft dropout"]
    out["max_grad_diff"] = max((replayed["grads"][n] - g).abs().max().item()
                               for n, g in plain["grads"].items())
    out["max_grad"] = max(g.abs().max().item() for g in plain["grads"].values())
    out["loss_diff"] = abs(replayed["loss"] - plain["loss"])
    for name in ("replayed", "peft dropout"):
        del out[name]["grads"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--arch", default="mistral-7b")
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in (1, 4):
        results.append(measure(args.arch, rows, args.seq))
        if CUDA:
            torch.cuda.empty_cache()
        (out / "check-activations.json").write_text(json.dumps(results, indent=1))
    lines = ["| tokens | dropout | saved GiB / layer (measured) | model GiB "
             "| fwd+bwd s (2 layers) |", "|---|---|---|---|---|"]
    for res in results:
        for name in ("replayed", "peft dropout"):
            r = res[name]
            lines.append(f"| {res['tokens']} | {name} | "
                         f"{', '.join(f'{v:.3f}' for v in r['saved_gib_per_layer'])} | "
                         f"{r['model_gib']:.3f} | {r['seconds']:.4f} |")
    lines += [f"\n{res['tokens']} tokens, same generator state: |loss diff| {res['loss_diff']:.3g},"
              f" max |grad diff| {res['max_grad_diff']:.3g} (max |grad| {res['max_grad']:.3g})"
              for res in results]
    report = "\n".join(lines)
    (out / "check-activations.md").write_text(report + "\n")
    print(report, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
