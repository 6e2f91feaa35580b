"""Package stage, `medqlora verify` and `medqlora generate`; the reference guide's loading code
runs on a package from the project root and from a folder where it was pulled."""
from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from adapter_fixture import adapter_params, make_adapter, write_test_split
from conftest import ROOT, run, write_params
from medqlora.ship import merging
from medqlora.ship import packaging
from medqlora.ship.manifest import verify

BASE_REL = "models/tiny-med-llama"
EVALUATE = {
    "n": 60, "n_diagnostic": 20,
    "base": {"perplexity": 41.5, "bleu": 1.2, "bleu_ci95": [0.6, 1.9], "rouge_l": 0.08,
             "diagnostic_accuracy": 0.25, "diagnostic_accuracy_ci95": [0.1, 0.45]},
    "adapter": {"perplexity": 6.3, "bleu": 14.8, "bleu_ci95": [11.0, 18.7], "rouge_l": 0.31,
                "diagnostic_accuracy": 0.7, "diagnostic_accuracy_ci95": [0.5, 0.9]},
    "generation": {"max_new_tokens": 12, "do_sample": False, "batch_size": 16, "seed": 42,
                   "decoding": "greedy"},
}
# What a package of the embedded default holds (tokenizer files as the tiny base ships them).
EXPECTED = {"README.md", "manifest.json", "meta.json", "adapter_config.json",
            "adapter_model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "images/loss_curve.png", "images/base_vs_adapter.png",
            "merged/config.json", "merged/generation_config.json", "merged/meta.json",
            "merged/model.safetensors", "merged/tokenizer.json", "merged/tokenizer_config.json"}
REFERENCE_CODE = """
import sys, torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
package = sys.argv[1]
config = PeftConfig.from_pretrained(package)
model = AutoModelForCausalLM.from_pretrained(
    config.base_model_name_or_path,
    quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16))
model = PeftModel.from_pretrained(model, package)
tokenizer = AutoTokenizer.from_pretrained(package)
ids = tokenizer("### Instruction:\\nWhat is anaemia?\\n\\n### Response:\\n", return_tensors="pt")
out = model.generate(**ids, max_new_tokens=8, do_sample=False)
print("BASE", config.base_model_name_or_path)
print("NEW_TOKENS", out.shape[1] - ids.input_ids.shape[1])
"""


def _inputs(tmp: Path, tiny_model: Path) -> dict[str, Path]:
    adapter = make_adapter(str(tiny_model), tmp / "adapter")
    data = write_test_split(tmp / "prepared", [
        "### Instruction:\nWhat is anaemia?\n\n### Response:\n",
        "### Instruction:\nFirst-line treatment of hypertension?\n\n### Response:\n"])
    metrics = tmp / "metrics"
    params = adapter_params(str(tiny_model), **{"merge.min_top1_agreement": 0.9})
    assert merging.run_merge(params, data, adapter, tmp / "merged", metrics / "merge.json") == 0
    (metrics / "evaluate.json").write_text(json.dumps(EVALUATE))
    (metrics / "train.json").write_text(json.dumps({"train_loss": 2.41, "eval_loss": 2.55}))
    live = tmp / "live" / "plots" / "metrics"
    for name, rows in (("train", "5\t3.1\n10\t2.6\n15\t2.4\n"), ("eval", "10\t2.7\n20\t2.55\n")):
        (live / name).mkdir(parents=True)
        (live / name / "loss.tsv").write_text("step\tloss\n" + rows)
    return {"adapter": adapter, "merged": tmp / "merged", "metrics": metrics,
            "plots": tmp / "live"}


def _build(inputs: dict[str, Path], out: Path) -> dict:
    params = adapter_params(BASE_REL, **{"package.include_merged": True})
    with contextlib.chdir(ROOT):  # stages run from the project root (base path, dvc.lock)
        return packaging.build_package(params, inputs["adapter"], inputs["merged"],
                                       inputs["metrics"], inputs["plots"], out,
                                       data_meta_path=out.parent / "no-data-meta.json")


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("package")
    inputs = _inputs(tmp, tiny_model)
    return inputs, _build(inputs, tmp / "package"), tmp / "package"


@pytest.mark.slow
def test_package_contents(built):
    _, manifest, pkg = built
    assert set(manifest["files"]) | {"manifest.json"} == EXPECTED
    assert {p.relative_to(pkg).as_posix() for p in pkg.rglob("*") if p.is_file()} == EXPECTED
    config = json.loads((pkg / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == BASE_REL
    generation = json.loads((pkg / "generation_config.json").read_text())
    assert (generation["max_new_tokens"], generation["do_sample"]) == (12, False)
    assert "temperature" not in generation  # greedy: sampling knobs are not written
    card = (pkg / "README.md").read_text()
    for text in ("Not a medical device", "without clinician review", "14.8 [11, 18.7]",
                 "0.7 [0.5, 0.9]", "Merge parity", "**passed**", "images/loss_curve.png",
                 "PeftModel.from_pretrained", "base_model: models/tiny-med-llama"):
        assert text in card, text
    lineage = manifest["lineage"]
    assert lineage["base"]["id"] == str(ROOT / BASE_REL) and lineage["merged"]["into"] == \
        "dequantized"
    assert lineage["merged"]["included"] is True and lineage["merged"]["dtype"] == "float32"
    # merged weights are hard links to models/merged, not a second copy
    inputs, _, _ = built
    assert (pkg / "merged" / "model.safetensors").stat().st_ino == \
        (inputs["merged"] / "model.safetensors").stat().st_ino
    assert lineage["libraries"]["peft"] and lineage["quantization"]["bnb_4bit_quant_type"] == "nf4"
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in manifest["files"].values())


@pytest.mark.slow
def test_failed_merge_still_ships_the_adapter_and_says_why(built, tmp_path):
    """A merge whose parity gate failed (here: merge.into original, min top-1 0.999) leaves a
    merged folder without weights; the package holds the adapter and states, in its manifest,
    meta.json and model card, that merged weights are absent and why."""
    inputs, _, _ = built
    data = write_test_split(tmp_path / "prepared", ["### Instruction:\nWhat is anaemia?\n\n"
                                                    "### Response:\n"])
    failing = adapter_params(str(ROOT / BASE_REL), **{"merge.into": "original",
                                                      "merge.min_top1_agreement": 0.999})
    metrics = tmp_path / "metrics"
    shutil.copytree(inputs["metrics"], metrics)
    assert merging.run_merge(failing, data, inputs["adapter"], tmp_path / "merged",
                             metrics / "merge.json") == 0
    assert json.loads((metrics / "merge.json").read_text())["passed"] is False
    manifest = _build({**inputs, "merged": tmp_path / "merged", "metrics": metrics},
                      tmp_path / "package")
    pkg = tmp_path / "package"
    assert not (pkg / "merged").exists()
    assert set(manifest["files"]) | {"manifest.json"} == {
        f for f in EXPECTED if not f.startswith("merged/")}
    merged = manifest["lineage"]["merged"]
    assert merged["included"] is False and merged["reason"].startswith("merge parity failed: ")
    meta = json.loads((pkg / "meta.json").read_text())
    assert meta["merged_weights"] == {"included": False, "reason": merged["reason"]}
    card = (pkg / "README.md").read_text()
    assert f"No merged weights are included ({merged['reason']})" in card
    assert "**FAILED**" in card and "were therefore **not** shipped" in card
    assert verify(pkg) == []


@pytest.mark.slow
def test_rebuild_gives_identical_manifest(built, tmp_path):
    inputs, manifest, pkg = built
    again = _build(inputs, tmp_path / "package")
    assert again == manifest
    assert (tmp_path / "package/manifest.json").read_bytes() == (pkg / "manifest.json").read_bytes()


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.slow
def test_rebuild_with_other_timings_is_byte_identical(built, tmp_path):
    # A second train run of the same inputs measures other speeds and memory, and may have
    # resumed: only metrics/measured/train.json differs (metrics/train.json holds none of it).
    # The package must not (no commit, no timing in any file), so a tag names one package.
    inputs, _, pkg = built
    metrics = tmp_path / "metrics"
    shutil.copytree(inputs["metrics"], metrics)
    (metrics / "measured").mkdir(exist_ok=True)
    (metrics / "measured" / "train.json").write_text(json.dumps({
        "tokens_per_second": 4379.9, "step_seconds_median": 0.34, "peak_memory_gib": 2.17,
        "peak_memory_gib_per_process": [2.17], "resumed_from_step": 2}))
    _build({**inputs, "metrics": metrics}, tmp_path / "package")
    again = tree_bytes(tmp_path / "package")
    assert set(again) == set(tree_bytes(pkg)) == EXPECTED
    assert [name for name, data in tree_bytes(pkg).items() if again[name] != data] == []


# The package stage as DVC runs it, with os.link refused (merged/ on another filesystem than
# models/merged, so its weights are copied, not hard-linked).
PACKAGE_WITHOUT_LINKS = """
import os, runpy, sys
def refuse(src, dst):
    raise OSError(18, os.strerror(18))  # EXDEV
os.link = refuse
sys.argv = ["stages/package.py", *sys.argv[1:]]
runpy.run_path("stages/package.py", run_name="__main__")
"""


def _limit_file_size(limit: int):
    """preexec_fn: `ulimit -f`, SIGXFSZ ignored (as CPython does) so writes fail with EFBIG."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
@pytest.mark.parametrize("limit, links", [(100_000, True), (2_000_000, False)],
                         ids=["adapter-copy", "merged-copy"])
def test_package_stage_under_ulimit_fails_clearly_and_keeps_previous(built, tmp_path, limit,
                                                                     links):
    """A 100 kB limit stops the adapter's copy (630 kB); 2 MB with hard links refused stops
    merged/model.safetensors' copy (7.3 MB). Either way: exit 1, one line naming the output,
    the previous package byte for byte, nothing else inside or beside it."""
    inputs, _, pkg = built
    out = tmp_path / "artifacts" / "package"
    shutil.copytree(pkg, out)
    before = tree_bytes(out)
    params = write_params(tmp_path / "params.yaml", {"package.include_merged": True})
    args = ["--params", str(params), "--adapter", str(inputs["adapter"]), "--merged",
            str(inputs["merged"]), "--metrics-dir", str(inputs["metrics"]), "--plots",
            str(inputs["plots"]), "--out", str(out)]
    cmd = [sys.executable, "stages/package.py", *args] if links else [
        sys.executable, "-c", PACKAGE_WITHOUT_LINKS, *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=_limit_file_size(limit),
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert (f"package: {out}: cannot write this output: File too large (a file would exceed "
            "the largest file this process may write (`ulimit -f`)") in proc.stderr, \
        proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert tree_bytes(out) == before
    assert [p.name for p in out.parent.iterdir()] == ["package"]  # no .package.tmp-* beside


@pytest.mark.slow
def test_verify_names_every_altered_missing_or_extra_file(built, tmp_path):
    _, manifest, pkg = built
    assert verify(pkg) == []
    for rel in sorted(EXPECTED):  # one changed byte in any file, the manifest included
        copy = tmp_path / rel.replace("/", "_")
        shutil.copytree(pkg, copy)
        data = bytearray((copy / rel).read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / rel).write_bytes(bytes(data))
        problems = verify(copy)
        assert len(problems) == 1 and problems[0].startswith(f"altered: {rel} "), (rel, problems)
        shutil.rmtree(copy)
    copy = tmp_path / "missing_extra"
    shutil.copytree(pkg, copy)
    (copy / "merged" / "model.safetensors").unlink()
    (copy / "notes.txt").write_text("x")
    assert verify(copy) == ["missing: merged/model.safetensors", "extra: notes.txt"]
    proc = run([sys.executable, "-m", "medqlora.cli", "verify", str(copy)], ROOT, check=False)
    assert proc.returncode == 1
    assert "missing: merged/model.safetensors" in proc.stderr and "extra: notes.txt" in proc.stderr
    proc = run([sys.executable, "-m", "medqlora.cli", "verify", str(pkg)], ROOT)
    assert proc.stdout.strip() == f"{pkg}: verified"


@pytest.mark.slow
def test_reference_loading_code_from_root_and_pulled_folder(built, tmp_path):
    _, _, pkg = built
    script = tmp_path / "load.py"
    script.write_text(REFERENCE_CODE)
    proc = run([sys.executable, str(script), str(pkg)], ROOT)
    assert "BASE models/tiny-med-llama" in proc.stdout and "NEW_TOKENS" in proc.stdout
    # A deployment folder: the package and the base pulled side by side, as docs/deploy.md shows.
    deploy = tmp_path / "deploy"
    shutil.copytree(pkg, deploy / "artifacts" / "package")
    shutil.copytree(ROOT / BASE_REL, deploy / BASE_REL)
    proc = run([sys.executable, str(script), "artifacts/package"], deploy)
    new = int(proc.stdout.split("NEW_TOKENS")[1].split()[0])
    assert 1 <= new <= 8


@pytest.mark.slow
def test_generate_cli_answers_and_refuses_tampered_package(built, tmp_path):
    _, _, pkg = built
    proc = run([sys.executable, "-m", "medqlora.cli", "generate", "--package", str(pkg),
                "--prompt", "What is anaemia?", "--stats"], ROOT)
    assert proc.stdout.strip(), "no answer printed"
    assert "tokens/s" in proc.stderr and "peak memory" in proc.stderr
    merged = run([sys.executable, "-m", "medqlora.cli", "generate", "--package", str(pkg),
                  "--prompt", "What is anaemia?", "--merged"], ROOT)
    assert merged.stdout.strip()
    bad = tmp_path / "bad"
    shutil.copytree(pkg, bad)
    (bad / "generation_config.json").write_text("{}")
    proc = run([sys.executable, "-m", "medqlora.cli", "generate", "--package", str(bad),
                "--prompt", "x"], ROOT, check=False)
    assert proc.returncode == 1 and "altered: generation_config.json" in proc.stderr
    assert "refusing" in proc.stderr
