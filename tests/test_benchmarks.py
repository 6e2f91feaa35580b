"""Standard benchmarks through lm-evaluation-harness (medqlora/evaluate/benchmarks.py, stages/benchmark.py).

The sample files come from scripts/make_benchmark_samples.py (made-up items in each public
layout). The slow test scores them on the tiny model with the pipeline and with the harness's
own `simple_evaluate` loading the model itself, and requires the same numbers, item by item;
tests/test_pipeline.py does the same through `dvc repro` against the `lm_eval` command.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medqlora.core.config import BenchmarkParams, ParamsError, build_params, load_params
from medqlora.evaluate import benchmarks as bm
from tests.conftest import ROOT, run, write_params

sys.path.insert(0, str(ROOT / "scripts"))
from make_benchmark_samples import write_samples  # noqa: E402

ALL_TASKS = tuple(bm.TASKS)


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> tuple[Path, dict]:
    """(project root, {task: {"path", "fewshot_path"}}) with the files under data/benchmarks."""
    root = tmp_path_factory.mktemp("bench")
    files = write_samples(root / "data/benchmarks/samples")
    return root, {t: {k: p.relative_to(root).as_posix() for k, p in f.items()}
                  for t, f in files.items()}


def bench(task: str, path: str, **kw) -> BenchmarkParams:
    return BenchmarkParams(task=task, path=path, fewshot_path=kw.get("fewshot_path"),
                           num_fewshot=kw.get("num_fewshot", 0), limit=kw.get("limit"))


# ---------------------------------------------------------------- layouts (no model)

def test_every_public_layout_reads_into_the_harness_layout(samples):
    root, files = samples
    medqa = [json.loads(line) for line in (root / files["medqa_4options"]["path"]).open()]
    rows = bm.read_medqa(root / files["medqa_4options"]["path"])
    assert len(rows) == 8
    assert rows[0] == {"sent1": medqa[0]["question"],
                       **{f"ending{i}": medqa[0]["options"][k] for i, k in enumerate("ABCD")},
                       "label": "ABCD".index(medqa[0]["answer_idx"])}
    mcq = [json.loads(line) for line in (root / files["medmcqa"]["path"]).open()]
    assert [r["cop"] for r in bm.read_medmcqa(root / files["medmcqa"]["path"])] == [
        m["cop"] - 1 for m in mcq]                      # public 1-4 -> harness 0-3
    pubmed = json.loads((root / files["pubmedqa"]["path"]).read_text())
    rows = bm.read_pubmedqa(root / files["pubmedqa"]["path"])
    assert [r["pubid"] for r in rows] == list(pubmed)   # file order kept
    assert rows[0]["final_decision"] == next(iter(pubmed.values()))["final_decision"]
    rows = bm.read_mmlu(root / files["mmlu_anatomy"]["path"], "anatomy")
    line = (root / files["mmlu_anatomy"]["path"]).read_text().splitlines()[0]
    assert len(rows) == 8 and rows[0]["answer"] == "ABCD".index(line[-1])
    assert rows[0]["subject"] == "anatomy" and len(rows[0]["choices"]) == 4


def test_check_files_applies_limit_and_reads_fewshot(samples):
    root, files = samples
    prepared = bm.check_files((bench("pubmedqa", files["pubmedqa"]["path"], limit=3),
                               bench("mmlu_anatomy", files["mmlu_anatomy"]["path"],
                                     fewshot_path=files["mmlu_anatomy"]["fewshot_path"],
                                     num_fewshot=5)),
                              "data/benchmarks", root)
    assert [(len(p.rows), p.items_in_file) for p in prepared] == [(3, 8), (8, 8)]
    assert len(prepared[1].fewshot_rows) == 5


BAD_FILES = [
    ("medqa_4options", "q.jsonl",
     '{"question": "q", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "B"}\n'
     '{"sent1": "q", "ending0": "a", "ending1": "b", "ending2": "c", "ending3": "d", "label": 1}\n',
     "q.jsonl:2: has sent1/ending0-3/label (the Hugging Face export)"),
    ("medqa_4options", "q.jsonl", '{"question": "q", "options": {"A": "a"}, "answer_idx": "A"}\n',
     "q.jsonl:1: options must map exactly A, B, C, D to texts, got ['A']"),
    ("medqa_4options", "q.jsonl", '\n{"question": "q", "options": "A. x"\n',
     "q.jsonl:2: not JSON"),
    ("medmcqa", "dev.json",
     '{"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 0}\n',
     "dev.json:1: cop 0 is not 1, 2, 3 or 4 (0-3 is the Hugging Face export"),
    ("medmcqa", "test.json", '{"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d"}\n',
     "test.json:1: missing cop"),
    ("pubmedqa", "p.json", '[{"QUESTION": "q"}]',
     "p.json: expected one JSON object PMID -> record, got list"),
    ("pubmedqa", "p.json",
     '{"123": {"QUESTION": "q", "CONTEXTS": ["c"], "final_decision": "perhaps"}}',
     "p.json: PMID 123: final_decision 'perhaps' is not yes, no or maybe"),
    ("mmlu_anatomy", "a.csv", "q,a,b,c,d,A\nq2,a,b,c,B\n",
     "a.csv:2: expected 6 columns (question, A, B, C, D, answer), got 5"),
    ("mmlu_anatomy", "a.csv", "question,A,B,C,D,answer\nq,a,b,c,d,E\n",
     "a.csv:1: is a header row"),
]


@pytest.mark.parametrize("task, name, text, expected", BAD_FILES,
                         ids=[f"{t}-{e.split(': ', 1)[1][:24]}" for t, _, _, e in BAD_FILES])
def test_wrong_layout_names_file_and_line(tmp_path, task, name, text, expected):
    path = tmp_path / "data/benchmarks" / name
    path.parent.mkdir(parents=True)
    path.write_text(text, encoding="utf-8")
    with pytest.raises(bm.BenchmarkError) as err:
        bm.check_files((bench(task, f"data/benchmarks/{name}"),), "data/benchmarks", tmp_path)
    assert any(p.startswith(f"evaluate.benchmarks[0].path: {path}") and
               expected.split(":", 1)[1] in p for p in err.value.problems), err.value.problems
    assert expected.split(":")[0] in str(err.value)


def test_every_problem_of_every_file_at_once(tmp_path):
    folder = tmp_path / "data/benchmarks"
    folder.mkdir(parents=True)
    (folder / "a.csv").write_text("q,a,b,c,d,X\nq,a,b,c,d,Y\n", encoding="utf-8")
    (folder / "m.json").write_text("{}", encoding="utf-8")
    (tmp_path / "elsewhere.csv").write_text("q,a,b,c,d,A\n", encoding="utf-8")
    with pytest.raises(bm.BenchmarkError) as err:
        bm.check_files((bench("mmlu_anatomy", "data/benchmarks/a.csv"),
                        bench("pubmedqa", "data/benchmarks/m.json"),
                        bench("mmlu_college_biology", "elsewhere.csv")),
                       "data/benchmarks", tmp_path)
    assert err.value.problems == [
        f"evaluate.benchmarks[0].path: {folder}/a.csv:1: answer 'X' is not one of A, B, C, D",
        f"evaluate.benchmarks[0].path: {folder}/a.csv:2: answer 'Y' is not one of A, B, C, D",
        f"evaluate.benchmarks[1].path: {folder}/m.json: no items (PubMedQA labeled JSON (PMID "
        "-> QUESTION, CONTEXTS, final_decision))",
        "evaluate.benchmarks[2].path: elsewhere.csv is outside data/benchmarks, the folder "
        "dvc.yaml tracks for the benchmark stage; move it there"]
    assert err.value.count == 4


def test_params_rules(tmp_path, samples):
    root, files = samples
    doc = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    doc["data"]["sources"] = [{"path": files["medqa_4options"]["path"], "format": "mcq"}]
    doc["evaluate"]["benchmarks"] = [
        {"task": "medqa_4options", "path": "data/benchmarks/missing.jsonl"},
        {"task": "mmlu_anatomy", "path": files["mmlu_anatomy"]["path"], "num_fewshot": 5},
        {"task": "mmlu_anatomy", "path": files["mmlu_anatomy"]["path"]},
        {"task": "mmlu_astronomy", "path": files["mmlu_anatomy"]["path"]},
    ]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    import os
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with pytest.raises(ParamsError) as err:
            load_params(path)
    finally:
        os.chdir(cwd)
    problems = [p for p in err.value.problems if p.startswith("evaluate.")]
    assert problems[0].startswith("evaluate.benchmarks[3].task: 'mmlu_astronomy' is not one of")
    assert problems[1:] == [
        "evaluate.benchmarks[0].path: data/benchmarks/missing.jsonl not found (relative to "
        f"{root}); README 'Standard benchmarks' says where to get it",
        "evaluate.benchmarks[1].fewshot_path: required with num_fewshot 5 (the file the harness "
        "draws examples from, e.g. the train split)",
        "evaluate.benchmarks[2].task: mmlu_anatomy is listed twice"]


OURS = {"task", "dataset_path", "dataset_name", "custom_dataset", "dataset_kwargs", "test_split",
        "validation_split", "training_split", "fewshot_split", "num_fewshot"}


def test_task_yaml_is_the_harness_task_with_only_its_data_pointed_at_local_files(samples,
                                                                                 tmp_path):
    from lm_eval.tasks._yaml_loader import load_yaml
    root, files = samples
    prepared = bm.check_files((bench("medmcqa", files["medmcqa"]["path"]),),
                              "data/benchmarks", root)
    tasks = bm.write_task_folder(prepared, tmp_path)
    harness = (bm.harness_dir() / "medmcqa/medmcqa.yaml").resolve()
    # Read by lm_eval's own loader: every harness key but the data's is the harness's value,
    # its prompt function now resolved next to the task file, in a copy of the same module.
    ours, theirs = (load_yaml(path, resolve_func=False) for path in (tasks / "medmcqa.yaml",
                                                                    harness))
    assert {k: v for k, v in ours.items() if k not in OURS} == {
        k: v.replace(str(harness.parent), str(tasks)) if isinstance(v, str) else v
        for k, v in theirs.items() if k not in OURS}
    assert ours["doc_to_text"] == f"{tasks}/utils_medmcqa.doc_to_text"
    assert (tasks / "utils_medmcqa.py").read_bytes() == (
        harness.parent / "utils_medmcqa.py").read_bytes()
    assert {k: ours[k] for k in OURS} == {
        "task": "medmcqa", "dataset_path": None, "dataset_name": None,
        "custom_dataset": f"{tasks}/task_data.load",
        "dataset_kwargs": {"data_files": {"test": "../data/medmcqa.test.jsonl"}},
        "test_split": "test", "validation_split": None, "training_split": None,
        "fewshot_split": None, "num_fewshot": 0}
    assert sorted(p.name for p in tasks.iterdir()) == ["medmcqa.yaml", "task_data.py",
                                                       "utils_medmcqa.py"]
    rows = [json.loads(line) for line in (tmp_path / "data/medmcqa.test.jsonl").open()]
    assert rows == prepared[0].rows
    shapes = bm.prompt_shapes(tasks, ["medmcqa"])
    assert shapes == {"medmcqa": "Question: <question>\nChoices:\nA. <option A>\nB. <option B>\n"
                                 "C. <option C>\nD. <option D>\nAnswer:"}


def test_task_folder_bytes_do_not_depend_on_where_the_checkout_lies(samples, tmp_path):
    # Two checkouts of one project in different folders: the same task folder, byte for byte
    # (no path of the checkout, nor of the venv's lm_eval, in any file).
    root, files = samples
    benches = tuple(bench(t, files[t]["path"], fewshot_path=files[t]["fewshot_path"],
                          num_fewshot=1) for t in ALL_TASKS)
    folders = []
    for name in ("one", "elsewhere/two"):
        checkout = tmp_path / name
        shutil.copytree(root / "data", checkout / "data")
        prepared = bm.check_files(benches, "data/benchmarks", checkout)
        folders.append(bm.write_task_folder(prepared, checkout / "benchmarks").parent)
    trees = [{p.relative_to(f).as_posix(): p.read_bytes() for p in sorted(f.rglob("*"))
              if p.is_file()} for f in folders]
    assert trees[0] == trees[1]
    assert len([name for name in trees[0] if name.endswith(".yaml")]) == len(ALL_TASKS)
    text = b"".join(trees[0].values())
    for folder in (tmp_path, bm.harness_dir(), bm.harness_dir().resolve()):
        assert str(folder).encode() not in text


def test_stage_reports_bad_files_before_loading_any_model(tmp_path):
    (tmp_path / "data/benchmarks").mkdir(parents=True)
    (tmp_path / "data/benchmarks/test.jsonl").write_text('{"question": "q"}\n', encoding="utf-8")
    params = write_params(tmp_path / "params.yaml", {
        "evaluate.benchmarks": [{"task": "medqa_4options", "path": "data/benchmarks/test.jsonl"}],
        "data.sources": [{"path": "data/benchmarks/test.jsonl", "format": "mcq"}]})
    # No adapter exists: had the stage loaded a model, it would fail on that instead.
    proc = run([sys.executable, str(ROOT / "stages/benchmark.py"), "--params", str(params),
                "--adapter", "missing-adapter", "--data", "data/benchmarks", "--out", "out",
                "--metrics", "benchmark.json"], tmp_path, check=False)
    assert proc.returncode == 1
    assert (f"evaluate.benchmarks[0].path: {Path('data/benchmarks/test.jsonl')}:1: missing "
            "options, answer_idx (MedQA 4-options layout: question, options {A..D}, "
            "answer_idx)") in proc.stderr
    assert "benchmark: nothing was run (1 problem(s) in the benchmark files" in proc.stderr
    assert "no model was loaded" in proc.stderr and "loaded base" not in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "benchmark.json").exists()


def five_option_project(tmp_path: Path, lines: int = 40) -> Path:
    """A project whose evaluate.benchmarks lists MedQA's 5-option test file as medqa_4options
    (jind11/MedQA data_clean/questions/US/test.jsonl: options A-E)."""
    path = tmp_path / "data/benchmarks/medqa/test.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps({
        "question": f"Question {i}?", "answer": "c", "answer_idx": "C",
        "options": {k: k.lower() for k in "ABCDE"}, "meta_info": "step1"}) + "\n"
        for i in range(lines)), encoding="utf-8")
    rel = "data/benchmarks/medqa/test.jsonl"
    return write_params(tmp_path / "params.yaml", {
        "evaluate.benchmarks": [{"task": "medqa_4options", "path": rel}],
        "data.sources": [{"path": rel, "format": "mcq"}]})


FIVE_OPTIONS_HINT = (
    "evaluate.benchmarks[0].path: data/benchmarks/medqa/test.jsonl: every bad line has 5 "
    "options (A-E), as MedQA's 5-option files do (data_clean/questions/US/<split>.jsonl); "
    "medqa_4options reads the 4-option one, data_clean/questions/US/4_options/"
    "phrases_no_exclude_test.jsonl (phrases_no_exclude_train.jsonl for fewshot_path)")


def test_five_option_medqa_counts_every_line_and_names_the_four_option_file(tmp_path):
    params = five_option_project(tmp_path)
    stage = run([sys.executable, str(ROOT / "stages/benchmark.py"), "--params", str(params),
                 "--adapter", "missing-adapter", "--out", "out", "--metrics", "benchmark.json"],
                tmp_path, check=False)
    validate = run([sys.executable, "-m", "medqlora.cli", "validate", "params.yaml"], tmp_path,
                   check=False, env={"PYTHONPATH": str(ROOT)})
    listing = [f"evaluate.benchmarks[0].path: data/benchmarks/medqa/test.jsonl:{n}: options must "
               "map exactly A, B, C, D to texts, got ['A', 'B', 'C', 'D', 'E']"
               for n in range(1, 21)] + [
        "evaluate.benchmarks[0].path: data/benchmarks/medqa/test.jsonl: ... and 20 more",
        FIVE_OPTIONS_HINT]
    assert (stage.returncode, validate.returncode) == (1, 2)
    assert [line for line in stage.stderr.splitlines() if line.startswith("evaluate.")] == \
        listing, stage.stderr[-3000:]
    assert stage.stderr.splitlines()[-1] == (
        "benchmark: nothing was run (40 problem(s) in the benchmark files; no model was loaded)")
    assert validate.stderr.splitlines() == listing + ["params.yaml: 40 problem(s)"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "benchmark.json").exists()


def test_validate_reads_every_listed_file_as_the_stage_does(tmp_path):
    # One bad line among good ones; a MedMCQA test.json (no answers); a params problem too:
    # all reported at once, each under its key path.
    params = five_option_project(tmp_path, lines=2)
    medqa = tmp_path / "data/benchmarks/medqa/test.jsonl"
    good = {"question": "q", "options": dict(zip("ABCD", "abcd")), "answer_idx": "B"}
    medqa.write_text(json.dumps(good) + "\n" + json.dumps({**good, "answer_idx": "E"}) + "\n")
    (tmp_path / "data/benchmarks/medmcqa").mkdir()
    (tmp_path / "data/benchmarks/medmcqa/test.json").write_text("".join(
        json.dumps({"id": str(i), "question": "q", "opa": "a", "opb": "b", "opc": "c",
                    "opd": "d"}) + "\n" for i in range(3)))
    write_params(params, {"evaluate.benchmarks": [
        {"task": "medqa_4options", "path": "data/benchmarks/medqa/test.jsonl"},
        {"task": "medmcqa", "path": "data/benchmarks/medmcqa/test.json"}],
        "lora.r": 0}, base=params)
    proc = run([sys.executable, "-m", "medqlora.cli", "validate", "params.yaml"], tmp_path,
               check=False, env={"PYTHONPATH": str(ROOT)})
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2
    assert lines[0].startswith("lora.r: ")
    mcq = "evaluate.benchmarks[1].path: data/benchmarks/medmcqa/test.json"
    assert lines[1:] == [
        "evaluate.benchmarks[0].path: data/benchmarks/medqa/test.jsonl:2: answer_idx 'E' is not "
        "one of A, B, C, D",
        *[f"{mcq}:{n}: missing cop (MedMCQA layout: question, opa, opb, opc, opd, cop 1-4; the "
          "public test.json has no cop)" for n in (1, 2, 3)],
        f"{mcq}: every bad line lacks cop (the answer), as the public test.json does (its "
        "answers are not published); score dev.json (fewshot_path: train.json)",
        "params.yaml: 5 problem(s)"]


def test_validate_says_valid_for_well_formed_benchmark_files(samples):
    root, files = samples
    params = write_params(root / "params.yaml", {
        "evaluate.benchmarks": [{"task": t, **f} for t, f in files.items()
                                if t in ("medqa_4options", "pubmedqa", "mmlu_anatomy")],
        "data.sources": [{"path": files["medqa_4options"]["path"], "format": "mcq"}]})
    proc = run([sys.executable, "-m", "medqlora.cli", "validate", str(params)], root,
               env={"PYTHONPATH": str(ROOT)})
    assert proc.stdout.strip() == f"{params}: valid"
    assert bm.DATA_DIR in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][
        "benchmark"]["deps"]


def test_no_benchmarks_writes_an_empty_result_without_lm_eval_or_torch(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "meta.json").write_text("{}", encoding="utf-8")
    script = (
        "import sys, json, yaml\n"
        "from medqlora.core.config import build_params\n"
        "from medqlora.evaluate.benchmarks import benchmark\n"
        f"params = build_params(yaml.safe_load(open({str(ROOT / 'params.yaml')!r})))\n"
        f"r = benchmark(params, {str(adapter)!r}, 'data/benchmarks', 'out', 'benchmark.json')\n"
        "print(json.dumps([r['tasks'], 'torch' in sys.modules, 'lm_eval' in sys.modules]))\n")
    proc = run([sys.executable, "-c", script], tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert json.loads(proc.stdout.splitlines()[-1]) == [{}, False, False]
    written = json.loads((tmp_path / "benchmark.json").read_text())
    assert written == {"items": 0, "lm_eval_version": bm.lm_eval_version(), "tasks": {}}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json"]


# ---------------------------------------------------------------- the harness itself (slow)

def lm_eval_cli(cwd: Path, pretrained: Path, adapter: Path | None, tasks_dir: Path,
                tasks: list[str], out: Path, batch_size: int = 8
                ) -> tuple[dict, dict[str, list[dict]]]:
    """(results, {task: logged samples}) of the harness's own command line (tests/
    test_pipeline.py runs it on what `dvc repro` scored)."""
    args = f"pretrained={pretrained},dtype=bfloat16" + (f",peft={adapter}" if adapter else "")
    run(["lm_eval", "--model", "hf", "--model_args", args, "--device", "cpu",
         "--batch_size", str(batch_size), "--include_path", str(tasks_dir), "--tasks", ",".join(tasks),
         "--output_path", str(out), "--log_samples"], cwd)
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = {t: [json.loads(line) for line in next(out.rglob(f"samples_{t}_*.jsonl")).open()]
               for t in tasks}
    return results, samples


def lm_eval_api(pretrained: Path, adapter: Path | None, tasks_dir: Path, tasks: list[str]
                ) -> tuple[dict, dict[str, list[dict]]]:
    """The same through the harness's Python entry point, the model loaded by the harness
    from its path (in-process: half the start-up time of the command line)."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    args = {"pretrained": str(pretrained), "dtype": "bfloat16", "device": "cpu",
            **({"peft": str(adapter)} if adapter else {})}
    results = lm_eval.simple_evaluate(
        model="hf", model_args=args, tasks=tasks, batch_size=8, log_samples=True,
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False))
    return results, results["samples"]


@pytest.mark.slow
def test_pipeline_numbers_equal_lm_eval_simple_evaluate(samples, tiny_model, tmp_path, monkeypatch):
    from tests.adapter_fixture import make_adapter
    root, files = samples
    adapter = make_adapter(str(tiny_model), tmp_path / "adapter", steps=12, lr=0.1)
    shots = {"medqa_4options": 2, "mmlu_anatomy": 5, "pubmedqa": 1}
    benches = [{"task": t, "path": files[t]["path"], "num_fewshot": shots.get(t, 0),
                "fewshot_path": files[t]["fewshot_path"] if t in shots else None,
                "limit": 6 if t == "medmcqa" else None} for t in ALL_TASKS]
    doc = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    doc["evaluate"]["benchmarks"], doc["evaluate"]["benchmark_batch_size"] = benches, 8
    params = build_params(doc)
    monkeypatch.chdir(root)  # stages run from the project root; benchmark paths are relative
    result = bm.benchmark(params, adapter, "data/benchmarks", tmp_path / "out",
                          tmp_path / "benchmark.json")
    assert sorted(result["tasks"]) == sorted(ALL_TASKS)
    assert result["items"] == 8 * 8 + 6
    # A function of the inputs: no timing (it is in the log), so a rerun gives the same bytes.
    assert set(json.loads((tmp_path / "benchmark.json").read_text())) == {
        "items", "lm_eval_version", "tasks"}
    assert result["tasks"]["medqa_4options"]["num_fewshot"] == 2
    items = {t: [json.loads(line) for line in (tmp_path / f"out/items/{t}.jsonl").open()]
             for t in ALL_TASKS}
    # The adapter is really attached: some choice's log-likelihood moves.
    assert any(i["base"]["loglikelihoods"] != i["adapter"]["loglikelihoods"]
               for rows in items.values() for i in rows)

    base_nf4 = bm.save_quantized_base(adapter, tmp_path / "base-nf4")
    for name, peft in (("adapter", adapter), ("base", None)):
        harness, logged = lm_eval_api(base_nf4, peft, tmp_path / "out/tasks", list(ALL_TASKS))
        for task in ALL_TASKS:
            assert bm.task_scores(harness, task) == result["tasks"][task][name], (name, task)
            assert harness["n-samples"][task]["effective"] == result["tasks"][task]["n"]
            assert harness["n-shot"][task] == result["tasks"][task]["num_fewshot"]
            theirs = sorted(logged[task], key=lambda s: s["doc_id"])
            assert [s["target"] for s in theirs] == [i["target"] for i in items[task]]
            for mine, their in zip(items[task], theirs):
                assert mine[name]["loglikelihoods"] == pytest.approx(
                    [float(r[0]) for r in their["filtered_resps"]], abs=1e-6)


BENCHMARK_CALL = """
import logging, sys, yaml
from medqlora.core.config import build_params
logging.basicConfig(level=logging.INFO)
from medqlora.evaluate.benchmarks import benchmark
params = build_params(yaml.safe_load(open(sys.argv[1], encoding="utf-8")))
benchmark(params, sys.argv[2], "data/benchmarks", "benchmarks", "metrics/benchmark.json")
"""


@pytest.mark.slow
def test_benchmark_leaves_no_data_in_home_and_same_bytes_in_any_checkout(samples, tiny_model,
                                                                         tmp_path):
    """The stage's library call, from two checkouts in different folders, each with its own
    empty HOME and no HF_HOME / HF_DATASETS_CACHE: nothing appears under $HOME/.cache (no
    datasets cache holds a copy of the items), and every output is the same bytes."""
    from tests.adapter_fixture import make_adapter
    root, files = samples
    adapter = make_adapter(str(tiny_model), tmp_path / "adapter", steps=2)
    doc = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    doc["evaluate"]["benchmark_batch_size"] = 8
    doc["evaluate"]["benchmarks"] = [
        {"task": "medqa_4options", **files["medqa_4options"], "num_fewshot": 1},
        {"task": "pubmedqa", "path": files["pubmedqa"]["path"], "limit": 4}]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HOME", "HF_DATASETS_CACHE", "XDG_CACHE_HOME", "MEDQLORA_CACHE")}
    outputs = []
    for name in ("one", "elsewhere/two"):
        checkout, home = tmp_path / name, tmp_path / f"home-{name.replace('/', '-')}"
        shutil.copytree(root / "data", checkout / "data")
        home.mkdir()
        proc = subprocess.run([sys.executable, "-c", BENCHMARK_CALL, str(tmp_path / "params.yaml"),
                               str(adapter)], cwd=checkout, capture_output=True, text=True,
                              env={**env, "HOME": str(home), "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not (home / ".cache").exists(), sorted(map(str, home.rglob("*")))[:5]
        assert "timing: benchmark adapter " in proc.stderr  # the log has the time, no output
        outputs.append({p.relative_to(checkout).as_posix(): p.read_bytes()
                        for folder in ("benchmarks", "metrics") for p in
                        sorted((checkout / folder).rglob("*")) if p.is_file()})
    assert sorted(outputs[0]) == [
        "benchmarks/data/medqa_4options.fewshot.jsonl", "benchmarks/data/medqa_4options.test.jsonl",
        "benchmarks/data/pubmedqa.test.jsonl", "benchmarks/items/medqa_4options.jsonl",
        "benchmarks/items/pubmedqa.jsonl", "benchmarks/meta.json",
        "benchmarks/tasks/medqa_4options.yaml", "benchmarks/tasks/preprocess_medqa.py",
        "benchmarks/tasks/preprocess_pubmedqa.py", "benchmarks/tasks/pubmedqa.yaml",
        "benchmarks/tasks/task_data.py", "metrics/benchmark.json"]
    assert [name for name in outputs[0] if outputs[0][name] != outputs[1][name]] == []


def test_stages_point_the_datasets_cache_inside_the_project(tmp_path):
    # Set before datasets is imported, over a shell's HF_DATASETS_CACHE (often a shared folder);
    # MEDQLORA_CACHE moves it with the rest of the project's cache.
    script = ("from medqlora.core import stage\nstage.datasets_cache_in_project()\n"
              "import datasets\nprint(datasets.config.HF_DATASETS_CACHE)\n")
    env = {"PYTHONPATH": str(ROOT), "HF_DATASETS_CACHE": str(tmp_path / "shared")}
    proc = run([sys.executable, "-c", script], tmp_path, env=env)
    assert proc.stdout.strip() == str(tmp_path / ".cache/medqlora/datasets")
    proc = run([sys.executable, "-c", script], tmp_path,
               env={**env, "MEDQLORA_CACHE": str(tmp_path / "elsewhere")})
    assert proc.stdout.strip() == str(tmp_path / "elsewhere/datasets")


def test_model_card_table_states_the_protocol():
    from medqlora.ship.modelcard import _benchmarks
    block = {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.25, "acc_norm_stderr": 0.05}
    text = _benchmarks({"lm_eval_version": "0.4.13", "tasks": {"medqa_4options": {
        "n": 1273, "num_fewshot": 0, "version": "Yaml", "file": "data/benchmarks/medqa/test.jsonl",
        "items_in_file": 1273, "sha256": "ab" * 32, "fewshot_file": None,
        "base": {**block, "acc": 0.4}, "adapter": block, "delta": {"acc": 0.1, "acc_norm": 0.0},
        "prompt_lines": ["Question: <question>", "Answer:"]}}})
    assert "lm-evaluation-harness 0.4.13" in text
    assert "| medqa_4options | 1273 | 0 | acc | 0.400 ± 0.100 | 0.500 ± 0.100 | +0.100 |" in text
    assert "| | | | acc_norm | 0.250 ± 0.050 | 0.250 ± 0.050 | +0.000 |" in text
    assert ("`medqa_4options` version Yaml, `data/benchmarks/medqa/test.jsonl` (1273 items, "
            "sha256 `abababababababab…`); zero-shot:") in text
    assert "  Question: <question>\n  Answer:" in text
    assert "No standard benchmark was run" in _benchmarks({"tasks": {}})


def test_evaluate_stage_lists_every_evaluate_key_but_the_benchmark_ones():
    # dvc.yaml cannot say "evaluate except benchmarks": the evaluate stage names its keys one
    # by one, so a new evaluate key must be listed there too (else changing it re-runs nothing).
    from medqlora.core.config import load_schema
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    keys = set(load_schema()["properties"]["evaluate"]["properties"]) - {
        "benchmarks", "benchmark_batch_size"}
    # and the parity gate's tolerance, which the decode copy's agreement check uses
    assert set(stages["evaluate"]["params"]) == {"seed"} | {f"evaluate.{k}" for k in keys} | {
        "merge.parity_prompts", "merge.max_effect_lost", "merge.min_top1_agreement"}
    assert set(stages["benchmark"]["params"]) == {
        "evaluate.benchmarks", "evaluate.benchmark_batch_size", "evaluate.compare_base"}
    assert "data/benchmarks" in stages["benchmark"]["deps"]
    assert "metrics/benchmark.json" in stages["package"]["deps"]


def test_readme_lm_eval_recipe_folder_is_git_ignored():
    # README's recipe writes a copy of the 4-bit base into models/base-nf4: never committed.
    assert "s('models/adapter', 'models/base-nf4')" in (ROOT / "README.md").read_text()
    proc = run(["git", "check-ignore", "-q", "models/base-nf4/model.safetensors"], ROOT,
               check=False)
    assert proc.returncode == 0, "models/base-nf4/ is not git-ignored"


def test_bench_pipeline_summary_reads_benchmark_json_without_timing(tmp_path):
    from bench.bench_pipeline import summary
    block = {"acc": 0.25, "acc_stderr": 0.1, "acc_norm": 0.5, "acc_norm_stderr": 0.1}
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/benchmark.json").write_text(json.dumps({
        "items": 8, "lm_eval_version": "0.4.13",
        "tasks": {"medqa_4options": {"n": 8, "base": block, "adapter": {**block, "acc": 0.5}}}}))
    assert summary("benchmark", tmp_path) == (
        "medqa_4options n 8: acc base 0.250, adapter 0.500 (synthetic items)")
