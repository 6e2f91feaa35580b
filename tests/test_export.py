"""`medqlora export` on the tiny package: the vLLM folder passes vLLM's load-time rules and
carries the exact `vllm serve` command; the GGUF files, written by llama.cpp's own converters,
load in llama.cpp (llama-cpp-python, built by `make llama-cpp` from the same sdist) with the
package's chat template and eos, and llama.cpp's greedy tokens equal transformers'.

Tolerance of the token comparison: the GGUF files are written in f32 and transformers runs the
same weights in float32, so the two differ only by the order of float32 sums; greedy decoding
of MAX_NEW tokens must then give the same tokens on every test prompt (measured: identical on
8 of 8 prompts for both the merged model and base + LoRA, 156 tokens each). The served model
(4-bit base + adapter, bf16 compute) is a different computation: bench/bench_gguf.py measures
its agreement (11 of 12 answers equal), it is not asserted here.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run
from medqlora.ship import export
from medqlora.data.templates import format_messages, format_prompt
from package_fixture import NAME, QUESTIONS, tiny_package  # noqa: F401  (fixture)

MAX_NEW = 24
CONVERSATIONS = [
    [{"role": "user", "content": "What is anaemia?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Define GFR."}],
    [{"role": "user", "content": "Normal sodium?"}, {"role": "assistant", "content": "135-145."},
     {"role": "user", "content": "And potassium?"}],
]


@pytest.fixture(scope="module")
def exported(tiny_package, tmp_path_factory) -> Path:
    if not (ROOT / export.LLAMA_CPP_HOME / "src" / "vendor" / "llama.cpp").is_dir():
        pytest.fail("llama.cpp's converters are missing: run `make llama-cpp` (`make test` does)")
    out = tmp_path_factory.mktemp("export") / "export"
    proc = run([sys.executable, "-m", "medqlora.cli", "export", str(tiny_package), "--out",
                str(out), "--gguf-type", "f32"], ROOT)
    assert "vllm serve" in proc.stdout
    return out


@pytest.mark.slow
def test_vllm_folder_and_command(exported, tiny_package):
    vllm = exported / "vllm"
    assert sorted(p.name for p in vllm.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (vllm / name).read_bytes() == (tiny_package / name).read_bytes()
    record = json.loads((exported / "export.json").read_text())
    command = record["targets"]["vllm"]["command"]
    assert command.splitlines()[0] == "vllm serve models/tiny-med-llama \\"
    for line in ("--enable-lora", f"--lora-modules {NAME}=vllm", "--max-lora-rank 16",
                 "--chat-template vllm/chat_template.jinja",
                 """--override-generation-config '{"max_new_tokens": 12, "temperature": 0.0}'"""):
        assert line in command, line
    assert command in (vllm / "README.md").read_text()
    files = {p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file()}
    assert set(record["files"]) == files - {"export.json"}


def test_vllm_rules_name_every_problem():
    names = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
             "base_model.model.model.embed_tokens.lora_embedding_A"]
    config = {"r": 600, "modules_to_save": ["lm_head"], "use_dora": True, "bias": "all"}
    problems = export.vllm_problems(config, names, "LlamaForCausalLM")
    assert [p.split(":")[0] for p in problems] == [
        "adapter_config.json r", "adapter_config.json modules_to_save",
        "adapter_config.json use_dora", "adapter_config.json bias",
        "adapter_config.json target_modules"]
    assert "['embed_tokens']" in problems[-1]
    assert export.vllm_problems({"r": 16}, names[:1], "LlamaForCausalLM") == []
    assert export.vllm_problems({"r": 16}, names[:1], "LlamaForCausalLM", 8) == [
        "adapter_config.json r: 16 is above --max-lora-rank 8; serve with --max-lora-rank 16"]
    assert "accepts only" in export.vllm_problems({"r": 16}, names[:1], "LlamaForCausalLM", 24)[0]
    assert "no vLLM LoRA module list" in export.vllm_problems({"r": 8}, names[:1], "Phi9")[0]


@pytest.mark.slow
def test_export_refuses_what_vllm_would_refuse(tiny_package, tmp_path):
    proc = run([sys.executable, "-m", "medqlora.cli", "export", str(tiny_package), "--out",
                str(tmp_path / "out"), "--targets", "vllm", "--max-lora-rank", "8"], ROOT,
               check=False)
    assert proc.returncode == 1
    assert "vllm: adapter_config.json r: 16 is above --max-lora-rank 8" in proc.stderr
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad"
    shutil.copytree(tiny_package, bad)
    (bad / "adapter_config.json").write_text("{}")
    proc = run([sys.executable, "-m", "medqlora.cli", "export", str(bad), "--out",
                str(tmp_path / "out")], ROOT, check=False)
    assert proc.returncode == 1 and "altered: adapter_config.json" in proc.stderr


def test_chat_template_renders_the_training_prompt(tiny_model):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    for system in ("", "You are a careful clinician."):
        template = export.chat_template(tokenizer, system)
        assert template.startswith("{{- bos_token -}}")
        for messages in CONVERSATIONS:
            text = tokenizer.apply_chat_template(messages, chat_template=template,
                                                 tokenize=False, add_generation_prompt=True)
            # Engines tokenise a rendered chat prompt without adding special tokens.
            assert tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer(
                format_messages(tokenizer, messages, system))["input_ids"], (system, messages)


@pytest.mark.slow
def test_modelfiles(exported):
    gguf = exported / "gguf"
    merged = (gguf / "Modelfile").read_text().splitlines()
    adapter = (gguf / "Modelfile.adapter").read_text().splitlines()
    assert merged[1] == f"FROM ./{NAME}-f32.gguf"
    assert adapter[1:3] == [f"FROM ./{NAME}-base-f32.gguf", f"ADAPTER ./{NAME}-lora-f32.gguf"]
    for lines in (merged, adapter):
        assert 'PARAMETER stop "</s>"' in lines and "PARAMETER num_predict 12" in lines
        assert "PARAMETER temperature 0" in lines
        text = "\n".join(lines)
        assert '{{ else if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n### Response:\n' \
            in text
        for line in lines:
            if line.startswith(("FROM ", "ADAPTER ")):
                assert (gguf / line.split()[1]).is_file(), line


# ---------------------------------------------------------------- llama.cpp against transformers

def llama(path: Path, lora: Path | None = None):
    from llama_cpp import Llama
    return Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=512,
                 n_threads=2, seed=0, verbose=False)


def llama_greedy(model, ids: list[int], eos: int) -> list[int]:
    model.reset()
    out = []
    for token in model.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                repeat_penalty=1.0):
        if token == eos or len(out) == MAX_NEW:
            break
        out.append(token)
    return out


def hf_greedy(model, ids: list[int], eos: int) -> list[int]:
    import torch
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos)[0, len(ids):].tolist()
    return out[:out.index(eos)] if eos in out else out


@pytest.fixture(scope="module")
def prompts(tiny_package):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_package))
    return tokenizer, [tokenizer(format_prompt(tokenizer, q))["input_ids"] for q in QUESTIONS]


@pytest.mark.slow
def test_gguf_loads_with_template_eos_and_same_tokenization(exported, prompts):
    tokenizer, ids = prompts
    model = llama(exported / "gguf" / f"{NAME}-f32.gguf")
    meta = model.metadata
    template = (exported / "vllm" / "chat_template.jinja").read_text()
    assert meta["tokenizer.chat_template"] == template
    assert (model.token_eos(), model.token_bos()) == (tokenizer.eos_token_id,
                                                      tokenizer.bos_token_id)
    assert meta["tokenizer.ggml.pre"] == "gpt-2"
    for question, want in zip(QUESTIONS, ids):
        text = format_prompt(tokenizer, question)
        assert model.tokenize(text.encode("utf-8"), add_bos=True, special=True) == want
    # llama.cpp's binding renders the embedded template to the same tokens.
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    formatter = Jinja2ChatFormatter(template=meta["tokenizer.chat_template"],
                                    eos_token=tokenizer.eos_token, bos_token=tokenizer.bos_token)
    for messages in CONVERSATIONS:
        rendered = formatter(messages=messages).prompt
        assert model.tokenize(rendered.encode("utf-8"), add_bos=False, special=True) == \
            tokenizer(format_messages(tokenizer, messages))["input_ids"]


@pytest.mark.slow
def test_gguf_greedy_tokens_equal_transformers(exported, tiny_package, prompts):
    import torch
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    tokenizer, ids = prompts
    eos = tokenizer.eos_token_id
    gguf = exported / "gguf"
    # Merged: the package's merged/ weights in float32 against NAME-f32.gguf.
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_package / "merged"), dtype=torch.float32)
    cpp = llama(gguf / f"{NAME}-f32.gguf")
    merged = [(hf_greedy(hf, p, eos), llama_greedy(cpp, p, eos)) for p in ids]
    # Base + LoRA: the dequantized base (as export staged it) + the adapter, unmerged.
    base = export.stage_base(tiny_package, exported.parent / "hf-base", "")
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
        str(base), dtype=torch.float32), str(tiny_package)).eval()
    cpp = llama(gguf / f"{NAME}-base-f32.gguf", gguf / f"{NAME}-lora-f32.gguf")
    lora = [(hf_greedy(hf, p, eos), llama_greedy(cpp, p, eos)) for p in ids]
    for label, pairs in (("merged", merged), ("base+lora", lora)):
        same = sum(a == b for a, b in pairs)
        print(f"\n{label}: llama.cpp greedy tokens equal transformers' on {same}/{len(pairs)}"
              f" prompts ({sum(len(a) for a, _ in pairs)} tokens)")
        assert all(a for a, _ in pairs)          # the comparison is not vacuous
        assert same == len(pairs), [(a, b) for a, b in pairs if a != b]
