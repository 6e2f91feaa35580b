"""The real small base, SmolLM2-135M-Instruct (ChatML template, real BPE tokenizer), from its
GGUF file (`make smollm2`): what random weights cannot show. The end-of-turn token is learned
and decoded on, the Ollama TEMPLATE renders the chat template's text (checked with Go's own
text/template, the engine Ollama renders with), and the whole pipeline on CPU stops answers
by end-of-turn in transformers and in llama.cpp.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import ROOT, SMOLLM2_GGUF
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
