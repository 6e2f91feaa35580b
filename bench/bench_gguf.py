"""GGUF exports against transformers: greedy token agreement in llama.cpp, by tensor type.

    make llama-cpp
    python bench/bench_gguf.py artifacts/package --types f32 bf16 q8_0 --max-new 32
    python bench/bench_gguf.py artifacts/package --types q8_0 --data data/prepared --n 20 \
        --max-new 256 --compare 32          # test prompts; first 32 tokens; stops by eos

For each --types T: `medqlora export --targets gguf --gguf-type T`, then greedy decoding of the
test questions (templated as training) in llama.cpp (llama-cpp-python) for the merged GGUF and
for base + LoRA GGUF, against two transformers references: the same merged weights in float32
(what the GGUF holds), and the served model (4-bit base + adapter in the compute dtype, what
`medqlora serve` and `medqlora generate` run). Columns: prompts whose whole greedy answer is
equal; matched prefix = tokens equal before the first difference / reference tokens.
With --data, the prompts are the first --n test rows of a prepared folder (their token ids as
training saw them), --compare K scores agreement on each answer's first K tokens (prompts whose
first K tokens are equal), and a column counts the llama.cpp answers that stopped by their
end-of-turn token before --max-new.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTIONS = ["What is anaemia?", "First-line treatment of hypertension?",
             "What does a high TSH mean?", "Define tachycardia.",
             "Which drug class is metformin?", "Quelle est la cause de l'anémie ?",
             "What is the normal range of potassium?", "Explain hypoglycaemia in one sentence.",
             "What is the first-line treatment of essential hypertension in adults?",
             "List the common adverse effects of metformin.",
             "How is iron deficiency anaemia diagnosed?", "What are the warning signs of sepsis?"]


def greedy_hf(model, ids, stops, max_new):
    import torch
    with torch.no_grad():
        out = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=max_new,
                             do_sample=False, eos_token_id=list(stops),
                             pad_token_id=stops[0])[0, len(ids):].tolist()
    ends = [k for k, token in enumerate(out) if token in stops]
    return out[:ends[0]] if ends else out


def greedy_cpp(model, ids, stops, max_new):
    model.reset()
    out = []
    for token in model.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        if token in stops or len(out) == max_new:
            break
        out.append(token)
    return out


def agreement(pairs, first=None):
    """(prompts with equal answers, matched prefix): on the first `first` tokens if given."""
    if first:
        pairs = [(a[:first], b[:first]) for a, b in pairs]
    equal = sum(a == b for a, b in pairs)
    prefix = 0
    for ref, got in pairs:
        n = 0
        while n < min(len(ref), len(got)) and ref[n] == got[n]:
            n += 1
        prefix += n
    total = sum(len(ref) for ref, _ in pairs)
    return f"{equal}/{len(pairs)}", f"{prefix}/{total} ({100 * prefix / max(total, 1):.1f}%)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package")
    parser.add_argument("--types", nargs="+", default=["f32", "bf16", "q8_0"])
    parser.add_argument("--max-new", type=int, default=32)
    parser.add_argument("--data", type=Path, help="prepared folder: prompts from its test split")
    parser.add_argument("--n", type=int, default=20, help="test prompts taken with --data")
    parser.add_argument("--compare", type=int, default=None,
                        help="agreement on each answer's first K tokens")
    args = parser.parse_args()
    import torch
    from llama_cpp import Llama
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from medqlora.ship import export
    from medqlora.evaluate import generation
    from medqlora.data.templates import format_prompt, stop_ids
    from medqlora.evaluate.evaluation import load_test, prompt_ids
    package = Path(args.package)
    served, tokenizer = generation.load_for_generation(package)
    eos = stop_ids(tokenizer)    # eos and the chat template's end of turn
    if args.data:
        prompts = [prompt_ids(row) for row in load_test(args.data, args.n)]
    else:
        prompts = [tokenizer(format_prompt(tokenizer, q))["input_ids"] for q in QUESTIONS]
    work = Path(tempfile.mkdtemp(prefix="bench_gguf_"))
    base = export.stage_base(package, work / "hf-base", "")
    refs = {
        "merged f32": AutoModelForCausalLM.from_pretrained(str(package / "merged"),
                                                           dtype=torch.float32),
        "base+adapter f32": PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
            str(base), dtype=torch.float32), str(package)).eval(),
        "served (4-bit + adapter)": served,
    }
    answers = {name: [greedy_hf(m, p, eos, args.max_new) for p in prompts]
               for name, m in refs.items()}
    rows = []
    for gguf_type in args.types:
        out = work / f"export-{gguf_type}"
        subprocess.run([sys.executable, "-m", "medqlora.cli", "export", str(package), "--out",
                        str(out), "--targets", "gguf", "--gguf-type", gguf_type], check=True,
                       capture_output=True)
        name = export.package_info(package, tokenizer)["name"]
        gguf = out / "gguf"
        for label, kwargs, own in (
                ("merged", {"model_path": str(gguf / f"{name}-{gguf_type}.gguf")}, "merged f32"),
                ("base + LoRA", {"model_path": str(gguf / f"{name}-base-{gguf_type}.gguf"),
                                 "lora_path": str(gguf / f"{name}-lora-{gguf_type}.gguf")},
                 "base+adapter f32")):
            cpp = Llama(n_ctx=1024, n_threads=2, seed=0, verbose=False, **kwargs)
            greedy_cpp(cpp, prompts[0], eos, 4)     # warm-up (weight repacking, caches)
            start = time.perf_counter()
            got = [greedy_cpp(cpp, p, eos, args.max_new) for p in prompts]
            speed = sum(map(len, got)) / (time.perf_counter() - start)
            stopped = sum(len(a) < args.max_new for a in got)
            for ref in (own, "served (4-bit + adapter)"):
                rows.append((gguf_type, label, ref,
                             *agreement(list(zip(answers[ref], got)), args.compare),
                             f"{stopped}/{len(got)}", f"{speed:.0f}"))
    for name, got in answers.items():
        print(f"transformers {name}: {sum(len(a) < args.max_new for a in got)}/{len(got)} "
              f"answers stopped by end of turn before {args.max_new} tokens")
    print(f"\n{len(prompts)} prompts, greedy, at most {args.max_new} new tokens"
          + (f", agreement on the first {args.compare}" if args.compare else "")
          + f"; llama.cpp {export._llama_cpp_version(export.llama_cpp_source())['commit']}")
    print("| GGUF type | llama.cpp model | transformers reference | equal answers | "
          "matched prefix | llama.cpp stopped by end of turn | llama.cpp tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
