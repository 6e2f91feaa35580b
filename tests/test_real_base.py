"""The real small base, SmolLM2-135M-Instruct (ChatML template, real BPE tokenizer), from its
GGUF file (`make smollm2`): what random weights cannot show. The end-of-turn token is learned
and decoded on, the Ollama TEMPLATE renders the chat template's text (checked with Go's own
text/template, the engine Ollama renders with), and the whole pipeline on CPU stops answers
by end-of-turn in transformers and in llama.cpp.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess

import pytest

from conftest import ROOT, SMOLLM2_CACHE, SMOLLM2_GGUF
from medqlora.data.templates import end_of_turn_id, format_messages, stop_ids
from medqlora.ship import export

pytestmark = pytest.mark.slow
GO_RENDERER = ROOT / "tests" / "fixtures" / "render_go_template.go"


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smollm2))


def test_gguf_base_materialises_once_with_its_tokenizer_and_template(smollm2, tokenizer):
    record = json.loads((smollm2 / "gguf.json").read_text())
    assert record["file"] == SMOLLM2_GGUF and record["bytes"] == 98_362_432
    assert record["sha256"].startswith("b179c9523d0e6a0f") and smollm2.name == "b179c9523d0e6a0f"
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config     # a plain checkpoint, loadable by anything
    assert (smollm2 / "model.safetensors").stat().st_size > 500e6   # 135M float32 weights
    assert tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer)) == "<|im_end|>"
    assert stop_ids(tokenizer) == [2]                      # eos is <|im_end|> too
    prompt = format_messages(tokenizer, [{"role": "user", "content": "Potassium 6.4?"}])
    assert prompt.endswith("<|im_start|>user\nPotassium 6.4?<|im_end|>\n<|im_start|>assistant\n")


def go_render(template: str, conversations: list[list[dict]], tmp_path) -> list[str]:
    env = {**os.environ, "GOCACHE": str(tmp_path / "gocache"), "HOME": str(tmp_path),
           "GOFLAGS": "-mod=mod", "GO111MODULE": "off"}
    proc = subprocess.run(["go", "run", str(GO_RENDERER)], input=json.dumps(
        {"template": template, "conversations": conversations}), capture_output=True,
        text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("system", ["", "Answer as a careful clinician."])
def test_ollama_template_renders_the_chat_templates_prompts(tokenizer, system, tmp_path):
    template, ollama_system = export.ollama_chat(tokenizer, system)
    assert ollama_system == (system or "You are a helpful AI assistant named SmolLM, trained "
                             "by Hugging Face")
    # With a package system text, a request's own system message replaces it in Ollama
    # (medqlora appends it): those conversations are not Ollama's to match.
    probes = [m for m in export.PROBES if not system or m[0]["role"] != "system"]
    assert len(probes) == (3 if not system else 2)
    conversations = []
    for messages in probes:   # Ollama puts SYSTEM first when a request has no system message
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": ollama_system}, *messages]
        conversations.append(messages)
    rendered = go_render(template, conversations, tmp_path)
    assert rendered == [format_messages(tokenizer, m, system) for m in probes]
    assert rendered[0].endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------- the pipeline on CPU

# A few steps: the point is the plumbing (template, end-of-turn label, stop ids, export), not
# learning; the GPU run of the full recipe measures learning (bench/README.md).
OVERRIDES = {
    "data.max_seq_length": 320, "data.heldout_sources": [],
    "train.max_steps": 3, "train.per_device_train_batch_size": 4,
    "train.per_device_eval_batch_size": 16, "train.eval_steps": 3, "train.save_steps": 3,
    "train.logging_steps": 1, "train.mixed_precision": "no",
    # float32 compute: a CPU pinned to AVX2 (core/cpu_numerics.py) emulates bf16 matmuls
    # about 10x slower than float32 ones; the bf16 path is the embedded default's tests'.
    "quantization.bnb_4bit_compute_dtype": "float32",
    "evaluate.max_examples": 4, "evaluate.max_new_tokens": 24, "evaluate.batch_size": 4,
    "evaluate.bootstrap_samples": 100, "merge.parity_prompts": 4,
}
# Short questions SmolLM2-135M-Instruct answers in one sentence, then <|im_end|> (p > 0.9
# under llama.cpp's q8_0). Not "is a potassium of 6.4 mmol/L high or low?": a 135M model
# loops on it ("A potassium of 6.4 mmol/L high is a potassium of ..."), or stops only after
# 26 tokens, depending on the CPU's kernels: CI's failed on it.
QUESTIONS = ["Is a fever a high or a low body temperature? Answer in one word.",
             "Name the organ that produces insulin. Answer in one word.",
             "What is the capital of France? Answer in one word."]
MAX_NEW = 48


@pytest.fixture(scope="module")
def real_run(smollm2, tmp_path_factory):
    """`dvc repro` of the SmolLM2 recipe, shrunk to 3 steps, then `medqlora export` (q8_0)."""
    from conftest import SMOLLM2, make_workspace, run, write_params
    ws = make_workspace(tmp_path_factory.mktemp("real") / "repo")
    (ws / "models").mkdir(exist_ok=True)
    (ws / "models" / SMOLLM2.name).symlink_to(SMOLLM2)   # the GGUF, not copied (98 MB)
    write_params(ws / "params.yaml", OVERRIDES,
                 base=ROOT / "examples" / "smollm2-135m-medical.yaml")
    env = {"MEDQLORA_CACHE": str(SMOLLM2_CACHE)}   # the materialised base, reused
    run(["dvc", "repro"], ws, env=env)
    run(["medqlora", "export", "artifacts/package", "--out", "export", "--targets",
         "gguf,ollama", "--gguf-type", "q8_0"], ws, env=env)
    return ws


def test_end_of_turn_is_in_every_label_and_survives_collation(real_run):
    import pyarrow.parquet as pq

    from medqlora.train.collation import Collator
    rows = pq.read_table(real_run / "data/prepared/train.parquet").to_pylist()
    assert rows and all(r["labels"][-1] == 2 and r["input_ids"][-1] == 2 for r in rows)
    # pad is <|im_end|> too: padding must not mask the labels' end of turn
    short, long = sorted(rows[:8], key=lambda r: len(r["input_ids"]))[::7][:2]
    batch = Collator(pad_token_id=2)([short, long])
    end = len(short["input_ids"]) - 1
    assert batch["labels"][0, end] == 2 and (batch["labels"][0, end + 1:] == -100).all()
    meta = json.loads((real_run / "data/prepared/meta.json").read_text())
    assert meta["tokenizer"]["end_of_turn_id"] == 2 and meta["template"] == "tokenizer-chat-template"


def test_the_package_records_the_gguf_base(real_run):
    manifest = json.loads((real_run / "artifacts/package/meta.json").read_text())
    gguf = manifest["adapter"]["base"]["gguf"]
    assert gguf["file"] == SMOLLM2_GGUF and gguf["sha256"].startswith("b179c9523d0e6a0f")
    evaluate = json.loads((real_run / "metrics/evaluate.json").read_text())
    assert evaluate["n"] == 4 and 0.0 <= evaluate["adapter"]["stopped_by_eos"] <= 1.0


def test_answers_stop_by_end_of_turn_in_transformers_and_llama_cpp(real_run):
    from unittest import mock

    from llama_cpp import Llama

    from medqlora.evaluate import generation
    package = real_run / "artifacts/package"
    with mock.patch.dict(os.environ, {"MEDQLORA_CACHE": str(SMOLLM2_CACHE)}), \
            contextlib.chdir(real_run):   # the package names its base relative to the project
        model, tokenizer = generation.load_for_generation(package)   # 4-bit base + adapter
    prompts = [tokenizer(format_messages(tokenizer, [{"role": "user", "content": q}]))[
        "input_ids"] for q in QUESTIONS]
    settings = generation.GenerationSettings(MAX_NEW, False, 1.0, 1.0, len(prompts), 0)
    answers = generation.generate_tokens(model, tokenizer, prompts, settings)
    assert all(0 < len(a) < MAX_NEW for a in answers), [tokenizer.decode(a) for a in answers]

    gguf = real_run / "export/gguf/smollm2-135m-medqlora-q8_0.gguf"
    cpp = Llama(model_path=str(gguf), n_ctx=512, n_threads=2, seed=0, verbose=False)
    for prompt, question in zip(prompts, QUESTIONS):
        text = format_messages(tokenizer, [{"role": "user", "content": question}])
        assert cpp.tokenize(text.encode(), add_bos=False, special=True) == prompt
        out = []
        for token in cpp.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                  repeat_penalty=1.0):
            if token == cpp.token_eos() or len(out) == MAX_NEW:
                break
            out.append(token)
        assert cpp.token_eos() == 2 and 0 < len(out) < MAX_NEW, cpp.detokenize(out)
    modelfile = (real_run / "export/gguf/Modelfile").read_text()
    assert '{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def test_serve_answers_real_questions_with_finish_reason_stop(real_run, tmp_path):
    from test_serving import Served
    served = Served(["artifacts/package"], real_run, tmp_path / "serve.log",
                    env={"MEDQLORA_CACHE": str(SMOLLM2_CACHE)})
    try:
        client = served.client()
        for question in QUESTIONS:
            reply = client.chat.completions.create(
                model="smollm2-135m-medqlora", max_tokens=MAX_NEW,
                messages=[{"role": "user", "content": question}])
            choice = reply.choices[0]
            assert choice.finish_reason == "stop" and choice.message.content, choice
            assert reply.usage.completion_tokens < MAX_NEW
    finally:
        served.stop()
