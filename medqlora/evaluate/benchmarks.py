"""Standard medical benchmarks through lm-evaluation-harness, on local copies of the public files.

    python stages/benchmark.py --params params.yaml --adapter models/adapter \
        --data data/benchmarks --out benchmarks --metrics metrics/benchmark.json

Nothing here re-implements a benchmark. For each `evaluate.benchmarks` entry:

1. read the file in its public layout (MedQA-USMLE 4-options JSONL, MedMCQA JSON lines,
   PubMedQA labeled JSON, MMLU header-less CSV) and check every record; all problems of all
   files are reported at once, by key path, file and line, before any model is loaded
   (`medqlora validate` runs the same check: file_problems);
2. write the records in the layout the harness task reads from the hub (the columns of
   GBaker/MedQA-USMLE-4-options-hf, openlifescienceai/medmcqa, bigbio/pubmed_qa, cais/mmlu)
   as JSONL, and a task YAML that is the harness's own task file (its includes merged, its
   prompt modules copied beside it: medqlora/evaluate/harness_tasks.py) with only its data
   source set: task_data.py, copied beside it too, reads the JSONL into memory. Prompts,
   answer choices, metrics (acc, acc_norm and their stderr) and few-shot sampling stay the
   harness's; every path in the folder is relative to it, so its bytes are the same in any
   checkout, and no datasets cache (~/.cache/huggingface/datasets) gets a copy of the items;
3. score the base and base + adapter exactly as shipped (the 4-bit base of the adapter's
   meta.json, loaded by medqlora.core.modeling, LoRA attached by peft; the base is the same model
   with the adapter switched off) with `lm_eval.simple_evaluate` on an `HFLM` wrapping it.

The task folder is a plain lm-evaluation-harness include path, so the harness's own command
gives the same numbers (tests/test_pipeline.py checks it after `dvc repro`; tests/
test_benchmarks.py checks every task, item by item, against `lm_eval.simple_evaluate`):

    lm_eval --model hf --model_args pretrained=models/base-nf4,peft=models/adapter,\
dtype=bfloat16 --batch_size 16 --include_path benchmarks/tasks --tasks medqa_4options

(transformers 5 dropped `load_in_4bit` from `from_pretrained`, so the CLI reads the 4-bit
settings from a saved pre-quantized base: `save_quantized_base` writes one.)
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from medqlora.core.config import BenchmarkParams, Params
from medqlora.core.outputs import atomic_dir, write_json
from medqlora.core.provenance import read_meta, write_meta

log = logging.getLogger(__name__)
LETTERS = ("A", "B", "C", "D")
PUBMEDQA_LABELS = ("yes", "no", "maybe")
MAX_PROBLEMS_PER_FILE = 20
DATA_DIR = "data/benchmarks"  # the stage's --data, its DVC dependency (dvc.yaml)
METRICS = ("acc", "acc_norm")


class BenchmarkError(ValueError):
    """Every problem found in the benchmark files, one `file:line: message` per line.

    `count` is the number of problems: more than the lines when a file's listing was capped
    ("... and 20 more"), fewer when a line is a hint about the whole file."""

    def __init__(self, problems: list[str], count: int | None = None):
        self.problems = problems
        self.count = len(problems) if count is None else count
        super().__init__("\n".join(problems))


class _Problems:
    """Problems of one file, capped; raises once at the end, with a hint about the whole
    file when every problem is of one kind that has one (e.g. 5-option MedQA)."""

    def __init__(self, path: Path):
        self.path, self.items, self.extra, self.kinds = path, [], 0, set()

    def add(self, where: str | int | None, message: str, kind: str | None = None) -> None:
        self.kinds.add(kind)
        if len(self.items) >= MAX_PROBLEMS_PER_FILE:
            self.extra += 1
            return
        place = f"{self.path}:{where}" if isinstance(where, int) else (
            f"{self.path}: {where}" if where else str(self.path))
        self.items.append(f"{place}: {message}")

    def raise_if_any(self, hints: dict[str, str] | None = None) -> None:
        if not self.items:
            return
        lines = self.items + ([f"{self.path}: ... and {self.extra} more"] if self.extra else [])
        kind = next(iter(self.kinds)) if len(self.kinds) == 1 else None
        if kind in (hints or {}):
            lines.append(f"{self.path}: {hints[kind]}")
        raise BenchmarkError(lines, len(self.items) + self.extra)


# ---------------------------------------------------------------- public layouts -> harness rows

def _text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _json_lines(path: Path, problems: _Problems) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSON-lines file."""
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                hint = (" (a JSON array or object: this layout has one JSON object per line)"
                        if number == 1 and line.lstrip()[:1] in "[{" and
                        not line.rstrip().endswith("}") else "")
                problems.add(number, f"not JSON ({err.msg}){hint}")
                continue
            if not isinstance(record, dict):
                problems.add(number, f"expected a JSON object, got {type(record).__name__}")
                continue
            yield number, record


# jind11/MedQA ships each US split twice: data_clean/questions/US/<split>.jsonl with options
# A-E, and 4_options/phrases_no_exclude_<split>.jsonl, the one medqa_4options scores.
MEDQA_5_OPTIONS = (
    "every bad line has 5 options (A-E), as MedQA's 5-option files do (data_clean/questions/US/"
    "<split>.jsonl); medqa_4options reads the 4-option one, data_clean/questions/US/4_options/"
    "phrases_no_exclude_test.jsonl (phrases_no_exclude_train.jsonl for fewshot_path)")
MEDMCQA_NO_ANSWERS = (
    "every bad line lacks cop (the answer), as the public test.json does (its answers are not "
    "published); score dev.json (fewshot_path: train.json)")


def read_medqa(path: Path) -> list[dict]:
    """MedQA-USMLE 4 options (jind11/MedQA data_clean/questions/US/4_options/*.jsonl):
    {"question", "options": {"A".."D"}, "answer_idx": "A".."D", ...} per line ->
    {"sent1", "ending0".."ending3", "label"} (GBaker/MedQA-USMLE-4-options-hf)."""
    problems, rows = _Problems(path), []
    for number, rec in _json_lines(path, problems):
        if "sent1" in rec and "question" not in rec:
            problems.add(number, "has sent1/ending0-3/label (the Hugging Face export); give the "
                                 "public MedQA JSONL with question/options/answer_idx")
            continue
        options = rec.get("options")
        missing = [k for k in ("question", "options", "answer_idx") if k not in rec]
        if missing:
            problems.add(number, f"missing {', '.join(missing)} (MedQA 4-options layout: "
                                 "question, options {A..D}, answer_idx)")
        elif not _text(rec["question"]):
            problems.add(number, "question is empty or not text")
        elif not isinstance(options, dict) or sorted(options) != list(LETTERS) or not all(
                _text(options[k]) for k in LETTERS):
            got = sorted(options) if isinstance(options, dict) else type(options).__name__
            problems.add(number, f"options must map exactly A, B, C, D to texts, got {got}",
                         "5 options" if got == [*LETTERS, "E"] else None)
        elif rec["answer_idx"] not in LETTERS:
            problems.add(number, f"answer_idx {rec['answer_idx']!r} is not one of A, B, C, D")
        else:
            rows.append({"sent1": rec["question"], **{f"ending{i}": options[k] for i, k in
                                                      enumerate(LETTERS)},
                         "label": LETTERS.index(rec["answer_idx"])})
    problems.raise_if_any({"5 options": MEDQA_5_OPTIONS})
    return rows


def read_medmcqa(path: Path) -> list[dict]:
    """MedMCQA (medmcqa.github.io data.zip dev.json / train.json: JSON lines despite the
    name): {"question", "opa".."opd", "cop": 1-4, ...} -> the same with cop 0-3, as
    openlifescienceai/medmcqa holds it. The public test.json has no answers (cop missing):
    the harness scores the dev split."""
    problems, rows = _Problems(path), []
    for number, rec in _json_lines(path, problems):
        missing = [k for k in ("question", "opa", "opb", "opc", "opd", "cop") if k not in rec]
        cop = rec.get("cop")
        if missing:
            problems.add(number, f"missing {', '.join(missing)} (MedMCQA layout: question, "
                                 "opa, opb, opc, opd, cop 1-4; the public test.json has no cop)",
                         "no cop" if missing == ["cop"] else None)
        elif not all(isinstance(rec[k], str) for k in ("question", "opa", "opb", "opc", "opd")):
            problems.add(number, "question and opa..opd must be text")
        elif not isinstance(cop, int) or isinstance(cop, bool) or not 1 <= cop <= 4:
            hint = " (0-3 is the Hugging Face export; the public files count 1-4)" if cop == 0 \
                else ""
            problems.add(number, f"cop {cop!r} is not 1, 2, 3 or 4{hint}")
        else:
            rows.append({"id": str(rec.get("id", number)), "question": rec["question"],
                         **{k: rec[k] for k in ("opa", "opb", "opc", "opd")}, "cop": cop - 1})
    problems.raise_if_any({"no cop": MEDMCQA_NO_ANSWERS})
    return rows


def read_pubmedqa(path: Path) -> list[dict]:
    """PubMedQA labeled (pubmedqa/pubmedqa data/ori_pqal.json, or test_set.json and
    pqal_fold0/train_set.json from its preprocess/split_dataset.py): one JSON object
    {PMID: {"QUESTION", "CONTEXTS": [...], "final_decision": yes|no|maybe, ...}} ->
    rows with those keys plus "pubid" (bigbio/pubmed_qa, pubmed_qa_labeled_fold0_source)."""
    problems, rows = _Problems(path), []
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        problems.add(err.lineno, f"not JSON ({err.msg}); PubMedQA labeled is one JSON object "
                                 "PMID -> record")
        problems.raise_if_any()
    if not isinstance(doc, dict):
        problems.add(None, f"expected one JSON object PMID -> record, got {type(doc).__name__}")
        problems.raise_if_any()
    for pmid, rec in doc.items():
        where = f"PMID {pmid}"
        if not isinstance(rec, dict):
            problems.add(where, f"expected an object, got {type(rec).__name__}")
            continue
        missing = [k for k in ("QUESTION", "CONTEXTS", "final_decision") if k not in rec]
        if missing:
            problems.add(where, f"missing {', '.join(missing)} (PubMedQA labeled layout: "
                                "QUESTION, CONTEXTS, final_decision)")
        elif not _text(rec["QUESTION"]):
            problems.add(where, "QUESTION is empty or not text")
        elif not isinstance(rec["CONTEXTS"], list) or not all(
                isinstance(c, str) for c in rec["CONTEXTS"]):
            problems.add(where, "CONTEXTS must be a list of texts")
        elif rec["final_decision"] not in PUBMEDQA_LABELS:
            problems.add(where, f"final_decision {rec['final_decision']!r} is not yes, no or "
                                "maybe")
        else:
            rows.append({"pubid": str(pmid), "QUESTION": rec["QUESTION"],
                         "CONTEXTS": rec["CONTEXTS"], "final_decision": rec["final_decision"],
                         "LONG_ANSWER": rec.get("LONG_ANSWER", "")})
    problems.raise_if_any()
    return rows


def read_mmlu(path: Path, subject: str) -> list[dict]:
    """MMLU (hendrycks/test data.tar: data/test/<subject>_test.csv, data/dev/<subject>_dev.csv):
    CSV without a header, question,A,B,C,D,answer letter -> {"question", "subject",
    "choices": [4], "answer": 0-3} (cais/mmlu)."""
    problems, rows = _Problems(path), []
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        for record in reader:
            number = reader.line_num
            if not record or not any(cell.strip() for cell in record):
                continue
            if number == 1 and [c.strip().lower() for c in record] == [
                    "question", "a", "b", "c", "d", "answer"]:
                problems.add(number, "is a header row; the public MMLU CSVs have none")
                continue
            if len(record) != 6:
                problems.add(number, f"expected 6 columns (question, A, B, C, D, answer), got "
                                     f"{len(record)}")
            elif record[5].strip() not in LETTERS:
                problems.add(number, f"answer {record[5]!r} is not one of A, B, C, D")
            else:
                rows.append({"question": record[0], "subject": subject,
                             "choices": record[1:5], "answer": LETTERS.index(record[5].strip())})
    problems.raise_if_any()
    return rows


@dataclass(frozen=True)
class Task:
    """How one harness task's public file is read, and where the harness defines the task."""
    read: Callable[[Path], list[dict]]
    harness_yaml: str        # under lm_eval/tasks/
    layout: str              # for docs and errors
    placeholder: dict        # a doc in the harness layout, to show the prompt in the card


MMLU_SUBJECTS = ("anatomy", "clinical_knowledge", "college_medicine", "medical_genetics",
                 "professional_medicine", "college_biology")
TASKS: dict[str, Task] = {
    "medqa_4options": Task(read_medqa, "medqa/medqa.yaml",
                           "MedQA-USMLE 4 options JSONL (question, options A-D, answer_idx)",
                           {"sent1": "<question>", **{f"ending{i}": f"<option {k}>" for i, k in
                                                      enumerate(LETTERS)}, "label": 0}),
    "medmcqa": Task(read_medmcqa, "medmcqa/medmcqa.yaml",
                    "MedMCQA JSON lines (question, opa-opd, cop 1-4)",
                    {"question": "<question>", "opa": "<option A>", "opb": "<option B>",
                     "opc": "<option C>", "opd": "<option D>", "cop": 0}),
    "pubmedqa": Task(read_pubmedqa, "pubmedqa/pubmedqa.yaml",
                     "PubMedQA labeled JSON (PMID -> QUESTION, CONTEXTS, final_decision)",
                     {"QUESTION": "<question>", "CONTEXTS": ["<abstract>"],
                      "final_decision": "yes"}),
    **{f"mmlu_{s}": Task(lambda p, s=s: read_mmlu(p, s), f"mmlu/default/mmlu_{s}.yaml",
                         "MMLU CSV without header (question, A, B, C, D, answer)",
                         {"question": "<question>", "subject": s,
                          "choices": [f"<option {k}>" for k in LETTERS], "answer": 0})
       for s in MMLU_SUBJECTS},
}


# ---------------------------------------------------------------- check, convert, task folder

@dataclass
class Prepared:
    """One benchmark's checked records in the harness layout."""
    bench: BenchmarkParams
    rows: list[dict]            # after `limit`
    items_in_file: int
    fewshot_rows: list[dict] | None
    sha256: str


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _read_file(task: Task, path: Path) -> tuple[list[dict], list[str], int]:
    """(rows, problems, number of problems) of one benchmark file."""
    try:
        rows = task.read(path)
    except BenchmarkError as err:
        return [], err.problems, err.count
    except UnicodeDecodeError as err:
        return [], [f"{path}: not UTF-8 text ({err.reason} at byte {err.start})"], 1
    if not rows:
        return [], [f"{path}: no items ({task.layout})"], 1
    return rows, [], 0


def _check(benchmarks: Iterable[tuple[int, BenchmarkParams]], data_dir: str | Path,
           root: str | Path) -> list[Prepared]:
    """check_files on (index in evaluate.benchmarks, entry) pairs."""
    problems: list[str] = []
    count, out = 0, []
    for i, bench in benchmarks:
        task = TASKS[bench.task]
        read: dict[str, list[dict]] = {}
        for key in ("path", "fewshot_path"):
            name = getattr(bench, key)
            if name is None:
                continue
            where, path = f"evaluate.benchmarks[{i}].{key}", Path(root) / name
            if not path.is_file():
                found, n = [f"{name} not found"], 1
            elif not _inside(path, Path(root) / data_dir):
                found, n = [f"{name} is outside {data_dir}, the folder dvc.yaml tracks for the "
                            "benchmark stage; move it there"], 1
            else:  # a capped listing counts its problems, not its lines
                read[key], found, n = _read_file(task, path)
            count += n
            problems.extend(f"{where}: {problem}" for problem in found)
        if read.get("path"):
            out.append(Prepared(bench, read["path"][:bench.limit], len(read["path"]),
                                read.get("fewshot_path"), _sha256(Path(root) / bench.path)))
    if problems:
        raise BenchmarkError(problems, count)
    return out


def check_files(benchmarks: tuple[BenchmarkParams, ...], data_dir: str | Path,
                root: str | Path = ".") -> list[Prepared]:
    """Read and check every benchmark file; raise one BenchmarkError listing all problems,
    each as `evaluate.benchmarks[i].path: file:line: message`.

    Paths are relative to `root` and must lie under `data_dir` (the folder dvc.yaml tracks
    as this stage's dependency, so a changed file re-runs the stage).
    """
    return _check(enumerate(benchmarks), data_dir, root)


def file_problems(entries: Any, data_dir: str | Path = DATA_DIR,
                  root: str | Path = ".") -> BenchmarkError | None:
    """For `medqlora validate`: what the benchmark stage's first step (check_files) would
    report about the files of a params file's `evaluate.benchmarks` list, read as the stage
    reads them. Entries the schema refuses and files that are missing are left out: the
    params validation reports those."""
    usable = []
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        if not (isinstance(entry, dict) and entry.get("task") in TASKS and isinstance(
                entry.get("path"), str) and (Path(root) / entry["path"]).is_file()):
            continue
        fewshot = entry.get("fewshot_path")
        fewshot = fewshot if isinstance(fewshot, str) and (Path(root) / fewshot).is_file() \
            else None
        usable.append((i, BenchmarkParams(task=entry["task"], path=entry["path"],
                                          fewshot_path=fewshot, num_fewshot=0, limit=None)))
    try:
        _check(usable, data_dir, root)
    except BenchmarkError as err:
        return err
    return None


def lm_eval_version() -> str | None:
    """The installed lm-evaluation-harness version (None when absent: nothing to score)."""
    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        return None


def harness_dir() -> Path:
    """lm_eval's own task folder (lm_eval/tasks), located without importing lm_eval."""
    import importlib.util
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise BenchmarkError(["lm_eval is not installed: pip install -r requirements.lock "
                              "(lm_eval pinned there)"])
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


DATA_MODULE = "task_data.py"  # medqlora/evaluate/task_data.py, copied beside the task files


def task_config(prepared: Prepared) -> tuple[dict[str, Any], dict[str, Path]]:
    """(the task YAML, the module files it needs): the harness's own task file with its
    includes merged in (harness_tasks.flatten), only its data source and shots set.

    The data is read by task_data.load (`custom_dataset`) from JSONL files given relative to
    the task folder, into memory: the folder's bytes do not depend on where the checkout or
    the venv lies, and no datasets cache gets a copy of the items. Split names are plumbing:
    the scored file is split `test`, the few-shot file split `train`.
    """
    from medqlora.evaluate import harness_tasks
    bench = prepared.bench
    harness_yaml = harness_dir() / TASKS[bench.task].harness_yaml
    if not harness_yaml.is_file():
        raise BenchmarkError([f"evaluate.benchmarks: task {bench.task}: {harness_yaml} is missing "
                              f"from lm_eval {lm_eval_version()}"])
    config, modules = harness_tasks.flatten(harness_yaml)
    if DATA_MODULE in modules:
        raise BenchmarkError([f"{harness_yaml}: uses a module named {DATA_MODULE}, the name of "
                              "medqlora's data loader; rename medqlora/evaluate/task_data.py"])
    files = {"test": f"../data/{bench.task}.test.jsonl"}
    if prepared.fewshot_rows:
        files["train"] = f"../data/{bench.task}.fewshot.jsonl"
    shots = "train" if prepared.fewshot_rows else None
    config.update({"task": bench.task, "dataset_path": None, "dataset_name": None,
                   "custom_dataset": harness_tasks.Function("task_data.load"),
                   "dataset_kwargs": {"data_files": files}, "test_split": "test",
                   "validation_split": None, "training_split": shots, "fewshot_split": shots,
                   "num_fewshot": bench.num_fewshot})
    return config, {**modules, DATA_MODULE: Path(__file__).with_name(DATA_MODULE)}


def write_task_folder(prepared: list[Prepared], out: Path) -> Path:
    """out/data/<task>.{test,fewshot}.jsonl, and out/tasks/<task>.yaml with the modules they
    name (the harness's prompt functions, task_data.py); returns out/tasks."""
    from medqlora.evaluate import harness_tasks
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "tasks").mkdir(parents=True, exist_ok=True)
    for item in prepared:
        _write_jsonl(out / "data" / f"{item.bench.task}.test.jsonl", item.rows)
        if item.fewshot_rows:
            _write_jsonl(out / "data" / f"{item.bench.task}.fewshot.jsonl", item.fewshot_rows)
        config, modules = task_config(item)
        header = (f"# Generated by medqlora.evaluate.benchmarks: lm_eval {lm_eval_version()}'s "
                  f"{TASKS[item.bench.task].harness_yaml} (includes merged),\n# on the local "
                  "files in ../data, read into memory by task_data.py.\n")
        harness_tasks.write(out / "tasks" / f"{item.bench.task}.yaml", config, modules, header)
    return out / "tasks"


# ---------------------------------------------------------------- scoring

def load_shipped_model(adapter_dir: str | Path):
    """(peft model, tokenizer, adapter meta): the 4-bit base + adapter as the package ships it
    (modeling.load_shipped)."""
    from medqlora.core.modeling import load_shipped
    return load_shipped(adapter_dir)


def save_quantized_base(adapter_dir: str | Path, out: str | Path) -> Path:
    """Save the adapter's 4-bit base, pre-quantized, with the adapter's tokenizer.

    For `lm_eval --model hf --model_args pretrained=<out>,peft=<adapter>`: transformers 5
    no longer takes `load_in_4bit` in `from_pretrained`, so the harness's CLI gets the NF4
    settings from this folder's config.json. The quantized weights are those medqlora builds.
    """
    from medqlora.core.modeling import load_base, saved_tokenizer, settings_from_meta
    model_params, quant, precision = settings_from_meta(read_meta(adapter_dir))
    base = load_base(model_params, quant, precision)
    base.save_pretrained(str(out))
    saved_tokenizer(adapter_dir, model_params).save_pretrained(str(out))
    return Path(out)


class _NoMetadataHint(logging.Filter):
    """Drops lm_eval's warning, for every task with a `custom_dataset`, that `--metadata` can
    pass it kwargs: task_data.load takes none, so the warning would only repeat per task."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


logging.getLogger("lm_eval.api.task").addFilter(_NoMetadataHint())


def run_harness(lm, tasks: list[str], tasks_dir: Path) -> dict[str, Any]:
    """lm_eval.simple_evaluate on the generated tasks only (defaults as the CLI's: seeds,
    bootstrap iterations, no chat template)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True)


def item_scores(results: dict[str, Any], task: str) -> list[dict[str, Any]]:
    """Per item, from the harness's logged samples: doc_id, gold index, the log-likelihood
    of each choice after the prompt, acc, and the harness's hash of the prompt."""
    return [{"doc_id": s["doc_id"], "target": s["target"],
             "loglikelihoods": [float(r[0]) for r in s["filtered_resps"]],
             "acc": s.get("acc"), "prompt_hash": s["prompt_hash"]}
            for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def write_items(out: Path, runs: dict[str, dict], tasks: list[str]) -> None:
    """out/items/<task>.jsonl: one line per item with each model's item scores (for paired
    comparisons and for checking a run against the harness's own `--log_samples`)."""
    (out / "items").mkdir(parents=True, exist_ok=True)
    for task in tasks:
        per_model = {name: item_scores(run, task) for name, run in runs.items()}
        adapter = per_model["adapter"]
        rows = [{"doc_id": row["doc_id"], "target": row["target"],
                 **{name: {k: items[i][k] for k in ("loglikelihoods", "acc")}
                    for name, items in per_model.items()}} for i, row in enumerate(adapter)]
        _write_jsonl(out / "items" / f"{task}.jsonl", rows)


def task_scores(results: dict[str, Any], task: str) -> dict[str, float | None]:
    """{"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} of one task (None if absent)."""
    block = results["results"][task]
    out: dict[str, float | None] = {}
    for metric in METRICS:
        out[metric] = block.get(f"{metric},none")
        stderr = block.get(f"{metric}_stderr,none")
        out[f"{metric}_stderr"] = stderr if isinstance(stderr, (int, float)) else None
    return out


def prompt_shapes(tasks_dir: Path, names: list[str]) -> dict[str, str]:
    """Each task's prompt as the harness builds it (description + doc_to_text), rendered on
    placeholder fields. Building the tasks also proves the folder loads, before any model."""
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    built = manager.load(names)["tasks"]
    return {name: (built[name].config.description or "")
            + built[name].doc_to_text(TASKS[name].placeholder) for name in names}


def summarise(prepared: list[Prepared], runs: dict[str, dict]) -> dict[str, Any]:
    """metrics/benchmark.json: per task n, shots, base/adapter/delta scores with stderr.

    No timing: the file is a DVC output and a function of its inputs (the scoring seconds
    go to the log, as `timing:` lines)."""
    adapter = runs["adapter"]
    tasks = {}
    for item in prepared:
        task = item.bench.task
        scores = {name: task_scores(run, task) for name, run in runs.items()}
        base = scores.get("base")
        tasks[task] = {
            "n": adapter["n-samples"][task]["effective"],
            "items_in_file": item.items_in_file,
            "num_fewshot": adapter["n-shot"][task],
            "version": str(adapter["versions"][task]),
            "file": item.bench.path, "sha256": item.sha256,
            "fewshot_file": item.bench.fewshot_path,
            "base": base, "adapter": scores["adapter"],
            "delta": {m: (None if base is None or base[m] is None else
                          scores["adapter"][m] - base[m]) for m in METRICS} if base else None,
        }
    return {"lm_eval_version": adapter["lm_eval_version"], "tasks": tasks,
            "items": sum(t["n"] for t in tasks.values())}


def score(adapter_dir: str | Path, prepared: list[Prepared], tasks_dir: Path, batch_size: int,
          compare_base: bool = True
          ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, float]]:
    """(metrics, adapter meta, harness results by model, scoring seconds by model): the
    harness on the base (adapter switched off: LoRA adds B·A to frozen weights, so off *is*
    the base) and base + adapter. The seconds are logged and returned, never in metrics."""
    from lm_eval.models.huggingface import HFLM
    model, tokenizer, meta = load_shipped_model(adapter_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    names = [p.bench.task for p in prepared]
    runs, seconds = {}, {}
    plan = ((("base", model.disable_adapter),) if compare_base else ()) + (
        ("adapter", contextlib.nullcontext),)
    for name, context in plan:
        start = time.perf_counter()
        with context():
            runs[name] = run_harness(lm, names, tasks_dir)
        seconds[name] = round(time.perf_counter() - start, 2)
        log.info("benchmark %s: %s", name, {t: task_scores(runs[name], t)["acc"] for t in names})
        log.info("timing: benchmark %s %.1f s (%s)", name, seconds[name], ", ".join(names))
    return summarise(prepared, runs), meta, runs, seconds


def benchmark(params: Params, adapter_dir: str | Path, data_dir: str | Path,
              out_dir: str | Path, metrics_path: str | Path) -> dict[str, Any]:
    """The stage: check files (before any model), write the task folder, score, write JSON.

    With no benchmarks listed, writes an empty result without loading lm_eval or a model.
    """
    cfg = params.evaluate
    prepared = check_files(cfg.benchmarks, data_dir)
    result: dict[str, Any] = {"lm_eval_version": lm_eval_version(), "tasks": {}, "items": 0}
    meta: dict[str, Any] = {}
    with atomic_dir(out_dir) as tmp:
        if prepared:
            tasks_dir = write_task_folder(prepared, tmp)
            prompts = prompt_shapes(tasks_dir, [p.bench.task for p in prepared])
            result, meta, runs, _ = score(adapter_dir, prepared, tasks_dir,
                                          cfg.benchmark_batch_size, cfg.compare_base)
            write_items(tmp, runs, [p.bench.task for p in prepared])
            for task, block in result["tasks"].items():
                # a list: `dvc metrics show` skips lists (a multi-line string breaks its table)
                block["prompt_lines"] = prompts[task].split("\n")
        write_meta(tmp, stage="benchmark",
                   params={"evaluate": {"benchmarks": params.raw["evaluate"]["benchmarks"],
                                        "benchmark_batch_size": cfg.benchmark_batch_size,
                                        "compare_base": cfg.compare_base}},
                   inputs={"adapter": adapter_dir,
                           **{p.bench.path: Path(p.bench.path) for p in prepared}},
                   extra={"base": meta.get("base"), "lm_eval": result["lm_eval_version"],
                          "quantization": meta.get("params", {}).get("quantization")})
    write_json(metrics_path, result)
    return result
