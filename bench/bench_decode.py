"""Decoding speed of each way to decode a QLoRA model, measured in one process on one GPU.

    python bench/bench_decode.py --arch mistral-7b --out bench/results/decode
    python bench/bench_decode.py --arch tiny --prompts 8 --new-tokens 16   # the driver on a CPU

Random-init weights of a real architecture (bench/archs.py: speed does not depend on values),
NF4 + double quant, bf16 compute, LoRA r=64 on all seven projections with random A and B. Every
prompt decodes exactly --new-tokens tokens (random weights never emit eos). Rows:

- static: transformers' model.generate on a left-padded batch of all prompts (the old path);
- decoder: medqlora.evaluate.decoding.Decoder (continuous batching, slotted cache), eager or
  with the decode step as CUDA graphs;
- over the 4-bit base + LoRA (what ships), the dequantized bf16 copy + LoRA (decode_copy), and
  the copy with the LoRA merged in;
- single stream (1 prompt) and 16 streams for the serve-shaped rows.

tokens/s = new tokens / wall time of the call (prefill included). The copy's agreement with the
4-bit reference (teacher-forced logits, merge's measure) is printed too; on random weights it
shows kernel noise only. Writes decode.json and decode.md under --out as rows finish.
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

from bench.bench_train import build_base  # noqa: E402
from medqlora.evaluate import decode_copy, decoding, parity  # noqa: E402
from medqlora.evaluate.decoding import left_pad  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def with_lora(base, rank: int):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=16, target_modules=TARGETS,
                                            lora_dropout=0.0, init_lora_weights=False))
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.bfloat16) * 0.05   # a small, real effect
    return model.eval()


def merge_into_copy(model):
    """The copy with each LoRA update added to its weight (float32 sum, rounded once), LoRA
    layers gone. peft's own merge expects the 4-bit layer the copy replaced."""
    from peft.tuners.lora import LoraLayer
    layers = [(parent, name, child) for parent in model.modules()
              for name, child in parent.named_children() if isinstance(child, LoraLayer)]
    for parent, name, layer in layers:
        base = layer.get_base_layer()
        weight = base.weight.data.float()
        for adapter in layer.active_adapters:
            weight += (layer.lora_B[adapter].weight.float() @ layer.lora_A[adapter].weight.float()
                       ) * layer.scaling[adapter]
        base.weight.data = weight.to(base.weight.dtype)
        setattr(parent, name, base)
    return model.get_base_model()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def static(model, prompts, new_tokens: int) -> int:
    ids, mask = left_pad(prompts, 0)
    device = next(model.parameters()).device
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0, eos_token_id=None, use_cache=True)
    return (out.shape[1] - ids.shape[1]) * len(prompts)


def decoder(model, prompts, new_tokens: int, graphs: bool, warm: bool = False):
    """A Decoder for these prompts, and the call that decodes them. warm: its graphs are
    captured before the clock starts (a server's state); else the capture is timed too (an
    evaluate stage's state)."""
    dec = decoding.Decoder(model, [], rows=len(prompts),
                           columns=max(map(len, prompts)) + new_tokens, graphs=graphs)
    if warm:
        dec.warm(prompts[0][:8])

    def go() -> int:
        requests = [decoding.Request(p, new_tokens) for p in prompts]
        dec.run(requests)
        return sum(len(r.tokens) for r in requests)
    return go


def timed(fn, *args, **kwargs) -> tuple[int, float]:
    sync()
    start = time.perf_counter()
    tokens = fn(*args, **kwargs)
    sync()
    return tokens, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="mistral-7b")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (smoke runs)")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=(64, 256),
                        help="prompt lengths drawn uniformly in [lo, hi]")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--skip-slow", action="store_true",
                        help="skip the eager Decoder over the 4-bit base and model.generate "
                             "over the copy")
    parser.add_argument("--out", default="bench/results/decode")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    vocab = 512 if args.arch == "tiny" else 32000
    lo, hi = args.prompt_tokens
    prompts = [torch.randint(3, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=gen)),),
                             generator=gen).tolist() for _ in range(args.prompts)]
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    graphs = torch.cuda.is_available()
    mode = "CUDA graphs" if graphs else "eager"
    rows: list[dict] = []

    def record(path: str, how: str, fn, *fn_args, **kw) -> None:
        try:
            tokens, seconds = timed(fn, *fn_args, **kw)
        except Exception as err:  # noqa: BLE001 - one failed row must not lose the others
            print(f"{path} / {how}: FAILED {type(err).__name__}: {err}", flush=True)
            return
        rows.append({"path": path, "how": how, "new_tokens": tokens, "seconds": round(seconds, 2),
                     "tokens_per_second": round(tokens / seconds, 1), "card": card})
        print(f"{path:34s} {how:34s} {tokens:7d} tok {seconds:7.1f} s "
              f"{tokens / seconds:9.1f} tok/s", flush=True)
        write(out, rows, args, card)

    model = with_lora(build_base(args.arch, args.layers), args.rank)
    n = args.new_tokens
    few = prompts[:16]
    reference = parity.sequence_logits(model, few[:8])
    with model.disable_adapter():
        effect = parity.compare_logits(reference, parity.sequence_logits(model, few[:8]))
    decoder(model, prompts[:2], 4, graphs)()   # warm-up (kernels, cuBLAS handles)
    record("4-bit + LoRA", "model.generate, static batch", static, model, prompts, n)
    if not args.skip_slow:
        record("4-bit + LoRA", "Decoder, eager", decoder(model, prompts, n, False, warm=False))
    record("4-bit + LoRA", f"Decoder, {mode}", decoder(model, prompts, n, graphs, warm=False))
    record("4-bit + LoRA", f"Decoder, {mode}, 1 stream",
           decoder(model, prompts[:1], n, graphs, warm=True))
    fits, why = decode_copy.fits(model)
    print(f"decode copy: {why}", flush=True)
    copy = decode_copy.DecodeCopy.make(model)
    stats = decode_copy.agreement(reference, parity.sequence_logits(model, few[:8]),
                                  effect, 0.1, 0.95)
    print(f"copy vs 4-bit reference: {json.dumps(stats)}", flush=True)
    copy.keep()
    if not args.skip_slow:
        record("bf16 copy + LoRA", "model.generate, static batch", static, model, prompts, n)
    record("bf16 copy + LoRA", f"Decoder, {mode}",
           decoder(model, prompts, n, graphs, warm=False))
    record("bf16 copy + LoRA", f"Decoder, {mode}, 1 stream",
           decoder(model, prompts[:1], n, graphs, warm=True))
    record("bf16 copy + LoRA", f"Decoder, {mode}, 16 streams",
           decoder(model, few, n, graphs, warm=True))
    merged = merge_into_copy(model)
    record("bf16, LoRA merged", "model.generate, static batch", static, merged, prompts, n)
    record("bf16, LoRA merged", f"Decoder, {mode}",
           decoder(merged, prompts, n, graphs, warm=False))
    record("bf16, LoRA merged", f"Decoder, {mode}, 1 stream",
           decoder(merged, prompts[:1], n, graphs, warm=True))
    (out / "agreement.json").write_text(json.dumps(stats, indent=1))
    return 0


def write(out: Path, rows: list[dict], args, card: str) -> None:
    (out / "decode.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    lines = [f"{args.arch}, {args.prompts} prompts x {args.new_tokens} new tokens "
             f"(prompts {args.prompt_tokens[0]}-{args.prompt_tokens[1]} tokens), LoRA r="
             f"{args.rank}, {card}", "",
             "| model as decoded | how | tokens/s | seconds |", "|---|---|---|---|"]
    lines += [f"| {r['path']} | {r['how']} | {r['tokens_per_second']:,.0f} | {r['seconds']} |"
              for r in rows]
    (out / "decode.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
