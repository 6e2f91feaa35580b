"""`medqlora export`: a verified package in the formats serving engines load, made by their tools.

    make llama-cpp                                           # once: llama.cpp's converters + build
    medqlora export artifacts/package --out artifacts/export
    medqlora export artifacts/package --out artifacts/export --targets vllm --max-lora-rank 64

artifacts/export/ (one folder per target, and what was made in export.json):
    vllm/     the adapter as vLLM loads it (adapter_config.json, adapter_model.safetensors),
              chat_template.jinja, and README.md with the exact `vllm serve` command
    gguf/     NAME-TYPE.gguf         merged weights        (llama.cpp convert_hf_to_gguf.py)
              NAME-base-TYPE.gguf    the base the adapter was trained against (the dequantized
                                     NF4 weights, as the merge stage uses)
              NAME-lora-TYPE.gguf    the adapter           (llama.cpp convert_lora_to_gguf.py)
              Modelfile, Modelfile.adapter   Ollama: merged, or base + ADAPTER
    export.json

vLLM checks are vLLM's own load-time rules (vllm/lora/peft_helper.py, vllm/config/lora.py): rank
at most --max-lora-rank, whose allowed values are 1, 8, 16, 32, 64, 128, 256, 320, 512 (default
16); no modules_to_save; no DoRA; bias "none"; target modules among the architecture's LoRA
modules. Every problem is reported at once, naming the adapter_config.json key.

GGUF files are written by llama.cpp's converters, run from the llama.cpp source that the pinned
llama-cpp-python sdist vendors (scripts/llama_cpp.sh puts it under .cache/llama.cpp/): the same
commit as the llama.cpp library tests/test_export.py loads them with. One thing is added: when
the converter does not recognise a BPE tokenizer's pre-tokenizer (its table is keyed by hashes of
known models' token ids, so a newly trained tokenizer such as the embedded tiny base's is never
in it) and the tokenizer.json declares exactly GPT-2's byte-level pre-tokenizer, the converter is
told "gpt-2", llama.cpp's name for that pre-tokenizer. Nothing else of the conversion changes, and
the test checks that llama.cpp then tokenises the test prompts to the same ids as transformers.

The chat template. A base without a chat template (the tiny base, Mistral-7B-v0.1) was trained
on medqlora's default template (templates.py); export writes it as Jinja (chat_template.jinja,
also embedded in the GGUF files as tokenizer.chat_template) and as an Ollama Go template, so
every engine builds the same prompt text as `medqlora generate`, with the same system text.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from medqlora.core.outputs import atomic_dir, read_json, sha256_file

log = logging.getLogger(__name__)
TARGETS = ("vllm", "gguf", "ollama")
GGUF_TYPES = ("auto", "f32", "f16", "bf16", "q8_0")
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM's LoRA-capable modules of the decoder architectures this project trains (their
# packed_modules_mapping: qkv_proj = q/k/v, gate_up_proj = gate/up).
VLLM_LORA_MODULES = {
    arch: ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                 "Qwen3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM")
}
# tokenizer.json's pre_tokenizer that is exactly GPT-2's (llama.cpp: LLAMA_VOCAB_PRE_TYPE_GPT2).
GPT2_PRE_TOKENIZER = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                      "use_regex": True}
LLAMA_CPP_HOME = Path(".cache/llama.cpp")
# `make llama-cpp` of the checkout this module lives in: found from any working directory (a
# deployment folder, a test workspace), after ./.cache/llama.cpp.
CHECKOUT_LLAMA_CPP = Path(__file__).resolve().parents[2] / LLAMA_CPP_HOME
VENDOR = Path("src") / "vendor" / "llama.cpp"   # where the sdist keeps llama.cpp
RESPONSE_MARK = "### Response:"


class ExportError(ValueError):
    """An export that cannot be made; `problems` lists every reason, one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


# ---------------------------------------------------------------- chat template

def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def chat_template(tokenizer, system: str = "") -> str:
    """Jinja that renders templates.format_messages' text (with the package's system text), bos
    first when the tokenizer adds one (engines tokenise a chat prompt without adding it)."""
    from medqlora.data.templates import DEFAULT_TEMPLATE, has_chat_template
    head = "{{- bos_token -}}\n" if _adds_bos(tokenizer) else ""
    merge = (
        "{%- set ns = namespace(system=" + json.dumps(system) + ", turns=messages) -%}\n"
        "{%- if messages and messages[0]['role'] == 'system' -%}\n"
        "{%- if messages[0]['content'] -%}"
        "{%- set ns.system = (ns.system ~ '\\n\\n' if ns.system else '') ~ messages[0]['content']"
        " -%}{%- endif -%}\n"
        "{%- set ns.turns = messages[1:] -%}\n"
        "{%- endif -%}\n")
    if has_chat_template(tokenizer):
        # The base's own template, given the system text as format_messages does.
        own = tokenizer.chat_template
        return (merge + "{%- if ns.system -%}{%- set messages = [{'role': 'system', 'content': "
                "ns.system}] + ns.turns -%}{%- else -%}{%- set messages = ns.turns -%}"
                "{%- endif -%}\n" + own) if system else own
    before, after = DEFAULT_TEMPLATE.split("{user_text}")
    return (head + merge
            + "{%- if ns.system -%}{{- ns.system ~ '\\n\\n' -}}{%- endif -%}\n"
            "{%- for m in ns.turns -%}\n"
            "{%- if m['role'] == 'user' -%}{{- " + json.dumps(before) + " ~ m['content'] ~ "
            + json.dumps(after) + " -}}\n"
            "{%- else -%}{{- m['content'] ~ '\\n\\n' -}}{%- endif -%}\n"
            "{%- endfor -%}\n")


# Chat formats whose Jinja templates can be written as an Ollama (Go) template: each message is
# prefix(role) + content + suffix, then the generation prompt. Which one a tokenizer's template
# is gets decided by rendering (ollama_chat), never by its name.
CHAT_FORMATS = {
    "chatml": ("", "<|im_start|>{role}\n", "<|im_end|>\n", "<|im_start|>assistant\n"),
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>{role}<|end_header_id|>\n\n",
               "<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
}
PROBES = [  # conversations the Go template must render exactly as the tokenizer does
    [{"role": "user", "content": "What is anaemia?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Define GFR."}],
    [{"role": "user", "content": "Normal sodium?"}, {"role": "assistant", "content": "135-145."},
     {"role": "user", "content": "And potassium?"}],
]


def render_chat_format(name: str, messages: list[dict[str, str]], system: str = "") -> str:
    """What CHAT_FORMATS[name]'s Go template renders for `messages`, with Ollama's rule for
    SYSTEM: a system message `system` goes first when the request has none."""
    head, prefix, suffix, generation = CHAT_FORMATS[name]
    if system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    return head + "".join(prefix.format(role=m["role"]) + m["content"] + suffix
                          for m in messages) + generation


def ollama_chat(tokenizer, system: str = "") -> tuple[str, str] | None:
    """(Go TEMPLATE, SYSTEM text) that render templates.format_messages' prompts (the
    tokenizer's chat template, the package's system text) for every PROBES conversation, or
    None when no CHAT_FORMATS entry does. SYSTEM is the package's system text, else the system
    message the template adds by itself (SmolLM2's "You are a helpful AI assistant...")."""
    from medqlora.data.templates import format_messages
    # A request's own system message replaces SYSTEM in Ollama, where format_messages appends
    # it to the package's system text: with a package system text, those conversations differ.
    probes = [m for m in PROBES if not system or m[0]["role"] != "system"]
    for name, (head, prefix, suffix, generation) in CHAT_FORMATS.items():
        default = _default_system(tokenizer, prefix.format(role="system"), suffix)
        wanted = system or default
        if all(render_chat_format(name, m, wanted) == format_messages(tokenizer, m, system)
               for m in probes):
            go_prefix = prefix.replace("{role}", "{{ .Role }}")
            return (head + "{{- range .Messages }}" + go_prefix + "{{ .Content }}" + suffix
                    + "{{ end }}" + generation, wanted)
    return None


def _default_system(tokenizer, system_prefix: str, suffix: str) -> str:
    """The system message a chat template inserts when the conversation has none ("")."""
    from medqlora.data.templates import format_messages
    text = format_messages(tokenizer, [{"role": "user", "content": "q"}])
    start = text.find(system_prefix)
    if start < 0:
        return ""
    body = text[start + len(system_prefix):]
    return body[:body.find(suffix)] if suffix in body else ""


def ollama_template() -> str:
    """templates.DEFAULT_TEMPLATE as an Ollama (Go) template over .Messages."""
    from medqlora.data.templates import DEFAULT_TEMPLATE
    before, after = DEFAULT_TEMPLATE.split("{user_text}")
    return ("{{- range .Messages }}"
            '{{- if eq .Role "system" }}{{ .Content }}\n\n'
            '{{ else if eq .Role "user" }}' + before + "{{ .Content }}" + after
            + '{{ else if eq .Role "assistant" }}{{ .Content }}\n\n'
            "{{ end }}{{- end }}")


# ---------------------------------------------------------------- vLLM

def vllm_problems(adapter_config: dict[str, Any], weight_names: list[str], architecture: str,
                  max_lora_rank: int | None = None) -> list[str]:
    """Why vLLM would refuse this adapter ([] when it loads), one line per problem."""
    problems = []
    rank = int(adapter_config.get("r") or 0)
    allowed = [r for r in VLLM_MAX_LORA_RANKS if r >= rank]
    if max_lora_rank is not None and max_lora_rank not in VLLM_MAX_LORA_RANKS:
        problems.append(f"--max-lora-rank {max_lora_rank}: vLLM accepts only "
                        f"{', '.join(map(str, VLLM_MAX_LORA_RANKS))}")
    elif not allowed:
        problems.append(f"adapter_config.json r: {rank} is above vLLM's largest --max-lora-rank "
                        f"({VLLM_MAX_LORA_RANKS[-1]}); retrain with lora.r <= 512")
    elif max_lora_rank is not None and rank > max_lora_rank:
        problems.append(f"adapter_config.json r: {rank} is above --max-lora-rank "
                        f"{max_lora_rank}; serve with --max-lora-rank {allowed[0]}")
    if adapter_config.get("modules_to_save"):
        problems.append(f"adapter_config.json modules_to_save: {adapter_config['modules_to_save']}"
                        " (vLLM only supports modules_to_save being None)")
    if adapter_config.get("use_dora"):
        problems.append("adapter_config.json use_dora: true (vLLM does not support DoRA; "
                        "retrain with lora.use_dora: false)")
    if (adapter_config.get("bias") or "none") != "none":
        problems.append(f"adapter_config.json bias: {adapter_config['bias']!r} (vLLM does not "
                        "support adapter biases; retrain with lora.bias: none)")
    supported = VLLM_LORA_MODULES.get(architecture)
    modules = sorted({name.split(".lora_")[0].rsplit(".", 1)[-1] for name in weight_names
                      if ".lora_" in name})
    if supported is None:
        problems.append(f"config.json architectures: {architecture} has no vLLM LoRA module list "
                        f"here (known: {', '.join(sorted(VLLM_LORA_MODULES))})")
    elif set(modules) - set(supported):
        problems.append(f"adapter_config.json target_modules: {sorted(set(modules) - set(supported))}"
                        f" are not LoRA modules of vLLM's {architecture} "
                        f"({', '.join(supported)})")
    if not modules:
        problems.append("adapter_model.safetensors: no lora_A/lora_B tensors")
    return problems


def vllm_command(base: str, revision: str | None, name: str, folder: str, rank: int,
                 max_new_tokens: int, greedy: bool) -> str:
    """The `vllm serve` command for the exported folder (paths relative to the export)."""
    defaults = {"max_new_tokens": max_new_tokens, **({"temperature": 0.0} if greedy else {})}
    lines = [f"vllm serve {base}"]
    if revision:
        lines.append(f"--revision {revision}")
    lines += ["--enable-lora", f"--lora-modules {name}={folder}",
              f"--max-lora-rank {min(r for r in VLLM_MAX_LORA_RANKS if r >= rank)}",
              f"--chat-template {folder}/chat_template.jinja",
              f"--override-generation-config '{json.dumps(defaults)}'"]
    return " \\\n    ".join(lines)


def export_vllm(package: Path, out: Path, info: dict[str, Any], tokenizer,
                max_lora_rank: int | None) -> dict[str, Any]:
    """vllm/: the adapter files, the chat template, a README with the `vllm serve` command."""
    from safetensors import safe_open
    config = read_json(package / "adapter_config.json")
    with safe_open(str(package / "adapter_model.safetensors"), "pt") as handle:
        names = list(handle.keys())
    problems = vllm_problems(config, names, info["architecture"], max_lora_rank)
    if problems:
        raise ExportError([f"vllm: {p}" for p in problems])
    out.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(package / name, out / name)
    (out / "chat_template.jinja").write_text(chat_template(tokenizer, info["system"]),
                                             encoding="utf-8")
    command = vllm_command(info["base"], info["revision"], info["name"], "vllm", config["r"],
                           info["max_new_tokens"], info["greedy"])
    (out / "README.md").write_text(
        f"# {info['name']} for vLLM\n\nThe LoRA adapter of package `{info['name']}` (rank "
        f"{config['r']}, {len({n.split('.lora_')[0] for n in names if '.lora_' in n})} LoRA "
        f"modules), checked against vLLM's load-time rules. From the export folder:\n\n"
        f"```bash\n{command}\n```\n\nClients send `\"model\": \"{info['name']}\"`. "
        "`chat_template.jinja` renders the prompts exactly as training built them (template "
        "and system text); the generation override is the package's decoding setting "
        "(`temperature 0` is greedy in vLLM).\n", encoding="utf-8")
    return {"command": command, "rank": config["r"]}


# ---------------------------------------------------------------- llama.cpp

def llama_cpp_source(path: str | Path | None = None) -> Path:
    """llama.cpp's source folder (convert_hf_to_gguf.py, convert_lora_to_gguf.py, gguf-py)."""
    candidates = [Path(p) for p in (path, os.environ.get("MEDQLORA_LLAMA_CPP")) if p]
    candidates += [LLAMA_CPP_HOME / VENDOR, CHECKOUT_LLAMA_CPP / VENDOR]
    for folder in candidates:
        if (folder / "convert_hf_to_gguf.py").is_file():
            return folder
    raise ExportError([f"llama.cpp's converters were not found in "
                       f"{', '.join(map(str, candidates))}: run `make llama-cpp` (puts the "
                       "pinned llama-cpp-python sdist's llama.cpp under .cache/llama.cpp), or "
                       "pass --llama-cpp DIR / set MEDQLORA_LLAMA_CPP to a llama.cpp checkout"])


# Runs a converter script as `python script.py ARGS`, with one addition (module docstring): an
# unrecognised BPE pre-tokenizer that tokenizer.json declares as exactly GPT-2's is named "gpt-2".
_CONVERT = """
import json, runpy, sys
from pathlib import Path
script = Path(sys.argv[1])
sys.argv = [str(script), *sys.argv[2:]]
sys.path[:0] = [str(script.parent), str(script.parent / "gguf-py")]
from conversion import base
recognised = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return recognised(self, tokenizer)
    except NotImplementedError:
        declared = json.loads((Path(self.dir_model) / "tokenizer.json").read_text("utf-8"))
        if declared.get("pre_tokenizer") == %s:
            print("medqlora: pre-tokenizer not in llama.cpp's table; tokenizer.json declares "
                  "GPT-2's byte-level regex: tokenizer.ggml.pre = gpt-2", file=sys.stderr)
            return "gpt-2"
        raise
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
runpy.run_path(str(script), run_name="__main__")
""" % repr(GPT2_PRE_TOKENIZER)


def run_converter(source: Path, script: str, args: list[str]) -> str:
    """Run one of llama.cpp's converters; its log on success, ExportError on failure."""
    cmd = [sys.executable, "-c", _CONVERT, str(source / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise ExportError([f"gguf: llama.cpp {script} failed ({proc.returncode}):",
                           *proc.stderr.strip().splitlines()[-15:]])
    return proc.stderr


def stage_base(package: Path, out: Path, template: str) -> Path:
    """The base the adapter was trained against as a Hugging Face folder: the dequantized NF4
    weights in the compute dtype (as the merge stage merges into), or the base itself when
    training did not quantize it; with the package's tokenizer and chat template."""
    import dataclasses

    from medqlora.core import modeling
    from medqlora.evaluate.generation import package_settings
    from medqlora.ship import merging
    model_params, quant, precision = package_settings(package)
    base = read_json(package / "adapter_config.json")["base_model_name_or_path"]
    settings = modeling.LoadSettings(dataclasses.replace(model_params, base=base), quant,
                                     precision)
    weights = None
    if quant.load_in_4bit:
        weights = merging.dequantized_weights(modeling.load_base(*settings))
    model = merging.plain_base(settings, weights, precision.compute_dtype)
    model.save_pretrained(str(out))
    _stage_tokenizer(package, out, template)
    return out


def _stage_tokenizer(package: Path, out: Path, template: str) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                 "special_tokens_map.json"):
        if (package / name).is_file():
            shutil.copyfile(package / name, out / name)
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")


def export_gguf(package: Path, out: Path, work: Path, info: dict[str, Any], template: str,
                gguf_type: str, source: Path) -> dict[str, Any]:
    """gguf/: merged model (when the package has merged/), base + LoRA adapter."""
    out.mkdir(parents=True)
    made: dict[str, Any] = {}
    name = info["name"]
    if (package / "merged" / "config.json").is_file():
        staged = work / "merged"
        shutil.copytree(package / "merged", staged)
        _stage_tokenizer(package, staged, template)
        made["merged"] = f"{name}-{gguf_type}.gguf"
        run_converter(source, "convert_hf_to_gguf.py",
                      [str(staged), "--outfile", str(out / made["merged"]), "--outtype", gguf_type])
    else:
        made["merged"] = None
        log.warning("%s has no merged/ (package.include_merged false, or merge parity failed): "
                    "no merged GGUF; use the base + LoRA pair", package)
    base = stage_base(package, work / "base", template)
    made["base"] = f"{name}-base-{gguf_type}.gguf"
    run_converter(source, "convert_hf_to_gguf.py",
                  [str(base), "--outfile", str(out / made["base"]), "--outtype", gguf_type])
    made["lora"] = f"{name}-lora-{gguf_type}.gguf"
    run_converter(source, "convert_lora_to_gguf.py",
                  ["--base", str(base), "--outfile", str(out / made["lora"]), "--outtype",
                   gguf_type, str(package)])
    return made


def modelfiles(out: Path, made: dict[str, Any], info: dict[str, Any], tokenizer) -> list[str]:
    """Ollama Modelfiles beside the GGUF files: merged, and base + ADAPTER.

    TEMPLATE renders the prompt training built: medqlora's default template as Go, or the
    tokenizer's chat template when a CHAT_FORMATS entry renders it exactly (else no TEMPLATE:
    Ollama then guesses one from the GGUF's chat template, logged as a warning). Stops: eos and
    the template's end-of-turn token."""
    from medqlora.data.templates import has_chat_template, stop_ids
    lines, system = [], info["system"]
    if not has_chat_template(tokenizer):
        lines.append(f'TEMPLATE """{ollama_template()}"""')
    elif (chat := ollama_chat(tokenizer, system)) is not None:
        lines.append(f'TEMPLATE """{chat[0]}"""')
        system = chat[1]
    else:
        log.warning("no Ollama TEMPLATE: the chat template is none of %s; Ollama will derive "
                    "one from the GGUF metadata (check its prompts)", ", ".join(CHAT_FORMATS))
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{tokenizer.convert_ids_to_tokens(i)}"' for i in stop_ids(tokenizer)]
    lines.append(f"PARAMETER num_predict {info['max_new_tokens']}")
    if info["greedy"]:
        lines.append("PARAMETER temperature 0")
    written = []
    for filename, head in (("Modelfile", [f"FROM ./{made['merged']}"] if made["merged"] else None),
                           ("Modelfile.adapter", [f"FROM ./{made['base']}",
                                                  f"ADAPTER ./{made['lora']}"])):
        if head is None:
            continue
        (out / filename).write_text(
            f"# Ollama: ollama create {info['name']} -f {filename}\n"
            + "\n".join(head + lines) + "\n", encoding="utf-8")
        written.append(filename)
    return written


# ---------------------------------------------------------------- the command

def package_info(package: Path, tokenizer) -> dict[str, Any]:
    """What every target needs to know about the package."""
    meta = read_json(package / "meta.json")
    adapter = read_json(package / "adapter_config.json")
    generation = meta.get("params", {}).get("generation", {})
    architecture = _architecture(package, adapter["base_model_name_or_path"])
    return {"name": meta.get("params", {}).get("package", {}).get("name") or package.name,
            "base": adapter["base_model_name_or_path"], "revision": adapter.get("revision"),
            "system": meta.get("prompt", {}).get("system", ""), "architecture": architecture,
            "max_new_tokens": int(generation.get("max_new_tokens", 64)),
            "greedy": not generation.get("do_sample", False)}


def _architecture(package: Path, base: str) -> str:
    merged = package / "merged" / "config.json"
    config = read_json(merged) if merged.is_file() else None
    if config is None:   # the base's own config (a GGUF base's materialised checkpoint)
        import dataclasses

        from transformers import AutoConfig

        from medqlora.core.modeling import base_source
        from medqlora.evaluate.generation import package_settings
        model = dataclasses.replace(package_settings(package).model, base=base)
        config = AutoConfig.from_pretrained(base_source(model)).to_dict()
    return (config.get("architectures") or ["?"])[0]


def export(package: str | Path, out: str | Path, targets: tuple[str, ...] = TARGETS,
           gguf_type: str = "auto", max_lora_rank: int | None = None,
           llama_cpp: str | Path | None = None) -> dict[str, Any]:
    """Write the export folder atomically; return export.json's content. WeightsFileError
    (medqlora.core.modeling) before anything is read when a weights file is truncated."""
    from medqlora.core import modeling
    from medqlora.evaluate.generation import check_weights, package_settings
    package = Path(package)
    check_weights(package)  # the adapter and merged/: every target reads one or both
    tokenizer = modeling.saved_tokenizer(package, package_settings(package)[0])
    info = package_info(package, tokenizer)
    template = chat_template(tokenizer, info["system"])
    source = llama_cpp_source(llama_cpp) if {"gguf", "ollama"} & set(targets) else None
    record: dict[str, Any] = {"package": {"name": info["name"], "manifest_sha256": sha256_file(
        package / "manifest.json")}, "targets": {}}
    with atomic_dir(out) as tmp:
        work = tmp / ".work"
        if "vllm" in targets:
            record["targets"]["vllm"] = export_vllm(package, tmp / "vllm", info, tokenizer,
                                                    max_lora_rank)
        if {"gguf", "ollama"} & set(targets):
            made = export_gguf(package, tmp / "gguf", work, info, template, gguf_type, source)
            record["targets"]["gguf"] = {**made, "type": gguf_type,
                                         "llama_cpp": _llama_cpp_version(source)}
            if "ollama" in targets:
                record["targets"]["ollama"] = modelfiles(tmp / "gguf", made, info, tokenizer)
        shutil.rmtree(work, ignore_errors=True)
        record["files"] = {p.relative_to(tmp).as_posix(): sha256_file(p)
                           for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / "export.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n",
                                         encoding="utf-8")
    return record


def _llama_cpp_version(source: Path) -> dict[str, str | None]:
    """The llama.cpp commit the converters come from (the sdist records it), and the sdist."""
    vendored = source.parts[-len(VENDOR.parts):] == VENDOR.parts   # `make llama-cpp`'s copy
    version = source.parents[len(VENDOR.parts) - 1] / "VERSION" if vendored else None
    recorded = version.read_text(encoding="utf-8").split() if version and version.is_file() else []
    return {"source": str(source), "llama_cpp_python": recorded[0] if recorded else None,
            "commit": recorded[1] if len(recorded) > 1 else None}
