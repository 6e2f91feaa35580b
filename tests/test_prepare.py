"""The prepare stage end to end on small fixtures: validation modes, counts, split, masks, PHI,
packing. Runs the real entrypoint (in-process, or as a subprocess where exit code and printed
output matter) with the tiny model's tokenizer, or a small one built offline when it is absent."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ROOT, TINY_MODEL, write_params
from hypothesis import given, settings
from hypothesis import strategies as st

from medqlora.core.config import build_params
from medqlora.data.dataset import SPLITS, check_splits
from medqlora.data.records import DataError

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import make_tokenizer  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
QA = '{{"id": "{id}", "instruction": "{q}", "input": "", "output": "{a}", "lang": "en"}}'


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    if (TINY_MODEL / "tokenizer_config.json").is_file():
        return TINY_MODEL
    return make_tokenizer.build(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _stage():
    spec = importlib.util.spec_from_file_location("prepare_stage", ROOT / "stages" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def workspace(tmp_path: Path, files: dict[str, bytes | str], sources: list[dict],
              tokenizer_dir: Path, **data) -> Path:
    """tmp_path with data/raw/<files> and a params.yaml reading them."""
    for name, content in files.items():
        path = tmp_path / "data" / "raw" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    overrides = {"data.sources": sources, "model.base": str(tokenizer_dir),
                 "data.max_seq_length": 128, "data.val_fraction": 0.25,
                 "data.test_fraction": 0.25, "data.on_invalid": "error", "data.phi": "error"}
    overrides.update({f"data.{k}": v for k, v in data.items()})
    write_params(tmp_path / "params.yaml", overrides)
    return tmp_path


def prepare(ws: Path, monkeypatch) -> int:
    monkeypatch.chdir(ws)
    return _stage().main(["--params", "params.yaml", "--out", "data/prepared",
                          "--metrics", "metrics/prepare.json"])


def rows(ws: Path, split: str) -> list[dict]:
    return pq.read_table(ws / "data" / "prepared" / f"{split}.parquet").to_pylist()


def all_rows(ws: Path) -> dict[str, list[dict]]:
    return {split: rows(ws, split) for split in ("train", "val", "test")}


def qa_lines(n: int, start: int = 0) -> list[str]:
    return [QA.format(id=f"qa-{i}", q=f"Question number {i} about the kidney?",
                      a=f"Answer {i}: the kidney filters blood.") for i in range(start, start + n)]


# ------------------------------------------------------------------ invalid records

LONG = " ".join(["filtration"] * 600)
BAD = [  # line numbers matter: the assertions name them
    QA.format(id="a1", q="What is anaemia?", a="A low haemoglobin concentration.").encode(),
    b'{"id": "a2", "instruction": "broken", "output": ',
    '{"id": "a3", "instruction": "caf\u00e9", "output": "x"}'.encode("latin-1"),
    b'{"id": "a4", "instruction": "What is missing?"}',
    b'{"id": "a5", "instruction": "What is empty?", "output": "   "}',
    b'{"id": "a6", "instruction": "What is typed?", "output": 42}',
    QA.format(id="a7", q="What is anaemia?", a="A low haemoglobin concentration.").encode(),
    QA.format(id="a8", q="What  is   anaemia? ", a="A low\\thaemoglobin concentration.").encode(),
    QA.format(id="a9", q="Describe the nephron.", a=LONG).encode(),
    b'{"id": "a10", "instruction": "Interpret:", "input": "Hb: 8.1 g/dL (ref: 12-16)", '
    b'"output": "Low haemoglobin: anaemia.", "label": "anemia", "lang": "en"}',
]
MCQ = ['{"id": "m1", "question": "Main extracellular cation?", "options": {"A": "K", "B": "Na"}, '
       '"answer": "B", "explanation": "Sodium.", "lang": "en"}',
       '{"id": "m2", "question": "Pick?", "options": {"A": "x", "B": "y"}, "answer": "E"}']
SOURCES = [{"path": "data/raw/bad.jsonl", "format": "alpaca"},
           {"path": "data/raw/mcq.jsonl", "format": "mcq"}]
EXPECTED_REJECTS = {"invalid_json": 1, "not_utf8": 1, "missing_field": 1, "empty_field": 1,
                    "wrong_type": 1, "invalid_answer": 1}


def bad_workspace(tmp_path, tokenizer_dir, **data):
    # The 4 records kept (a1, a9, a10, m1) have buckets .421, .953, .394, .913: test below 0.4
    # and val below 0.5 give each split one at least (a10 test, a1 val, a9 + m1 train).
    data = {"test_fraction": 0.4, "val_fraction": 0.1, **data}
    return workspace(tmp_path, {"bad.jsonl": b"\n".join(BAD) + b"\n",
                                "mcq.jsonl": "\n".join(MCQ) + "\n"}, SOURCES, tokenizer_dir, **data)


def test_on_invalid_error_lists_every_bad_record_and_writes_nothing(
        tmp_path, tokenizer_dir, monkeypatch, capfd):
    ws = bad_workspace(tmp_path, tokenizer_dir)
    assert prepare(ws, monkeypatch) == 1
    err = capfd.readouterr().err
    for line in ["data/raw/bad.jsonl:2: broken JSON",
                 "data/raw/bad.jsonl:3: not UTF-8 text",
                 "data/raw/bad.jsonl:4: output is missing",
                 "data/raw/bad.jsonl:5: output is empty",
                 "data/raw/bad.jsonl:6: output must be text, got a number",
                 "data/raw/mcq.jsonl:2: answer must be one of the option letters A, B (got 'E')"]:
        assert line in err
    assert sum(":" in ln and ln.startswith("data/raw/") for ln in err.splitlines()) == 6
    assert not (ws / "data" / "prepared").exists()
    assert not (ws / "metrics").exists()
    assert sorted(p.name for p in (ws / "data").iterdir()) == ["raw"]  # no temp folder left


def test_max_errors_reported_caps_the_list(tmp_path, tokenizer_dir, monkeypatch, capfd):
    ws = bad_workspace(tmp_path, tokenizer_dir, max_errors_reported=2)
    assert prepare(ws, monkeypatch) == 1
    err = capfd.readouterr().err
    assert "data/raw/bad.jsonl:3" in err and "data/raw/bad.jsonl:4" not in err
    assert "... and 4 more" in err


def test_on_invalid_skip_counts_equal_the_rejects_file(tmp_path, tokenizer_dir, monkeypatch):
    ws = bad_workspace(tmp_path, tokenizer_dir, on_invalid="skip")
    assert prepare(ws, monkeypatch) == 0
    metrics = json.loads((ws / "metrics" / "prepare.json").read_text())
    rejects = [json.loads(line) for line in
               (ws / "data" / "prepared" / "rejects.jsonl").read_text().splitlines()]
    assert Counter(r["reason"] for r in rejects) == metrics["rejected_by_reason"] == EXPECTED_REJECTS
    assert [r["source"] for r in rejects] == [f"data/raw/bad.jsonl:{i}" for i in range(2, 7)] + [
        "data/raw/mcq.jsonl:2"]
    assert all(set(r) == {"source", "reason", "message"} for r in rejects)
    assert "caf" not in json.dumps(rejects) and "What is typed" not in json.dumps(rejects)
    assert (metrics["records_in"], metrics["rejected"]) == (12, 6)
    assert (metrics["duplicates"], metrics["duplicates_exact"], metrics["duplicates_normalised"]) == (2, 1, 1)
    assert (metrics["truncated"], metrics["dropped_overlength"], metrics["leakage"]) == (1, 0, 0)
    assert sum(metrics["splits"].values()) == 12 - 6 - 2
    kept = {r["record_id"]: r for split in all_rows(ws).values() for r in split}
    assert sorted(kept) == ["a1", "a10", "a9", "m1"]  # first occurrence of a duplicate wins
    assert kept["a9"]["length"] == 128 and metrics["length"]["max"] == 128
    assert (kept["a10"]["kind"], kept["a10"]["label"]) == ("lab", "anemia")
    meta = json.loads((ws / "data" / "prepared" / "meta.json").read_text())
    assert set(meta["inputs"]) == {"data/raw/bad.jsonl", "data/raw/mcq.jsonl"}
    assert meta["counts"]["splits"] == metrics["splits"] and meta["max_seq_length"] == 128


def test_overlength_drop_is_counted(tmp_path, tokenizer_dir, monkeypatch):
    ws = bad_workspace(tmp_path, tokenizer_dir, on_invalid="skip", overlength="drop")
    assert prepare(ws, monkeypatch) == 0
    metrics = json.loads((ws / "metrics" / "prepare.json").read_text())
    assert (metrics["truncated"], metrics["dropped_overlength"]) == (0, 1)
    assert sum(metrics["splits"].values()) == 3


# ------------------------------------------------------------------ empty sources and splits

def earlier_outputs(ws: Path) -> dict[Path, bytes]:
    """A previous run's outputs, which a failed prepare must leave byte for byte."""
    files = {ws / "data/prepared/train.parquet": b"earlier train split",
             ws / "data/prepared/meta.json": b'{"stage": "prepare"}\n',
             ws / "metrics/prepare.json": b'{"records_in": 12}\n'}
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return files


def assert_untouched(ws: Path, files: dict[Path, bytes]) -> None:
    assert {p: p.read_bytes() for p in files} == files
    assert sorted(p.name for p in (ws / "data/prepared").iterdir()) == ["meta.json",
                                                                       "train.parquet"]
    assert sorted(p.name for p in (ws / "data").iterdir()) == ["prepared", "raw"]  # no temp


@pytest.mark.parametrize("content", [b"", b"\n\n  \n\t\n", b"\xef\xbb\xbf\n"],
                         ids=["empty", "blank-lines", "bom-only"])
def test_a_source_without_records_fails_naming_it(tmp_path, tokenizer_dir, monkeypatch, capfd,
                                                  content):
    ws = workspace(tmp_path, {"qa.jsonl": "\n".join(qa_lines(12)) + "\n", "empty.jsonl": content},
                   [{"path": "data/raw/qa.jsonl", "format": "alpaca"},
                    {"path": "data/raw/empty.jsonl", "format": "alpaca"}], tokenizer_dir)
    files = earlier_outputs(ws)
    assert prepare(ws, monkeypatch) == 1
    assert capfd.readouterr().err.splitlines()[-3:] == [
        "data/raw/empty.jsonl: holds no records (the file is empty or has blank lines only); "
        "fill it or remove it from data.sources",
        "fix the files named above",
        "prepare: nothing was written (data/prepared and metrics/prepare.json left as they were)"]
    assert_untouched(ws, files)


def test_a_source_whose_records_are_all_skipped_fails_naming_it(tmp_path, tokenizer_dir,
                                                                monkeypatch, capfd):
    ws = workspace(tmp_path, {"qa.jsonl": "\n".join(qa_lines(12)) + "\n",
                              "bad.jsonl": b'{"instruction": "x"}\n{"output": "y"}\n'},
                   [{"path": "data/raw/qa.jsonl", "format": "alpaca"},
                    {"path": "data/raw/bad.jsonl", "format": "alpaca"}], tokenizer_dir,
                   on_invalid="skip")
    files = earlier_outputs(ws)
    assert prepare(ws, monkeypatch) == 1
    assert ("data/raw/bad.jsonl: all 2 records are invalid; set data.on_invalid: error to list "
            "them with their reasons") in capfd.readouterr().err.splitlines()
    assert_untouched(ws, files)


def test_an_empty_split_fails_naming_the_fraction(tmp_path, tokenizer_dir, monkeypatch, capfd):
    # 12 records, buckets in EXPECTED_SPLIT's comment: val (between test 0.25 and 0.25 + 0.01)
    # gets none; test gets 7, train 4.
    ws = workspace(tmp_path, {"qa.jsonl": "\n".join(qa_lines(12)) + "\n"},
                   [{"path": "data/raw/qa.jsonl", "format": "alpaca"}], tokenizer_dir,
                   val_fraction=0.01)
    files = earlier_outputs(ws)
    assert prepare(ws, monkeypatch) == 1
    assert capfd.readouterr().err.splitlines()[-2:] == [
        "data/prepared/val.parquet: the val split would be empty: none of the 12 unique records "
        "fell in it (data.val_fraction: 0.01, about 0.1 expected); raise data.val_fraction or "
        "add records",
        "prepare: nothing was written (data/prepared and metrics/prepare.json left as they were)"]
    assert_untouched(ws, files)


def test_a_split_emptied_by_overlength_drops_names_max_seq_length(tmp_path, tokenizer_dir,
                                                                  monkeypatch, capfd):
    # qa-1 is the only val record (bucket .283); a 600-word answer makes it overlong
    lines = qa_lines(12)
    lines[1] = QA.format(id="qa-1", q="Question number 1 about the kidney?", a=LONG)
    ws = workspace(tmp_path, {"qa.jsonl": "\n".join(lines) + "\n"},
                   [{"path": "data/raw/qa.jsonl", "format": "alpaca"}], tokenizer_dir,
                   overlength="drop")
    files = earlier_outputs(ws)
    assert prepare(ws, monkeypatch) == 1
    assert ("data/prepared/val.parquet: the val split would be empty: every record in it (1) "
            "is longer than data.max_seq_length (128) and was dropped; raise "
            "data.max_seq_length or set data.overlength: truncate"
            ) in capfd.readouterr().err.splitlines()
    assert_untouched(ws, files)


BOMB = "".join(f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}" if i else '"lol"'] * 9) + "]\n"
               for i in range(9))  # 9^9 values once expanded


@pytest.mark.parametrize("change, problem", [
    (lambda text, ws: BOMB + text.replace("runner:\n", "runner:\n  env: *x8\n", 1),
     "params.yaml:4:5: expands to more than 5,000 values once its aliases are expanded (the "
     "limit for a params file); write the values out, or use fewer aliases"),
    (lambda text, ws: text.replace("val_fraction: 0.25", "val_fraction: .nan", 1),
     "data.val_fraction: nan is not a finite number (NaN and infinities are refused)"),
    (lambda text, ws: text.replace("data/raw/qa.jsonl", "../outside.jsonl"),
     "data.sources[0].path: ../outside.jsonl lies outside the project folder {ws}: nothing "
     "versions it; copy it into the project (e.g. under data/raw/)"),
    (lambda text, ws: text.replace("data/raw/qa.jsonl", "data/raw/link.jsonl"),
     "data.sources[0].path: data/raw/link.jsonl lies outside the project folder {ws} (a symlink "
     "to {outside}): nothing versions it; copy it into the project (e.g. under data/raw/)"),
], ids=["alias-bomb", "nan", "dot-dot", "symlink-out"])
def test_hostile_params_stop_prepare_before_anything_is_written(tmp_path, tokenizer_dir,
                                                                monkeypatch, capfd, change,
                                                                problem):
    ws = workspace(tmp_path / "ws", {"qa.jsonl": "\n".join(qa_lines(12)) + "\n"},
                   [{"path": "data/raw/qa.jsonl", "format": "alpaca"}], tokenizer_dir)
    outside = tmp_path / "outside.jsonl"
    outside.write_text("\n".join(qa_lines(12)) + "\n")
    (ws / "data/raw/link.jsonl").symlink_to(outside)
    params = ws / "params.yaml"
    params.write_text(change(params.read_text(), ws), encoding="utf-8")
    files = earlier_outputs(ws)
    with pytest.raises(SystemExit) as exit_:
        prepare(ws, monkeypatch)
    assert exit_.value.code == 2
    err = capfd.readouterr().err.splitlines()
    assert err == [problem.format(ws=ws.resolve(), outside=outside.resolve()),
                   "prepare: params.yaml is invalid (1 problem(s)); nothing was run"]
    assert_untouched(ws, files)


@settings(max_examples=200, deadline=None)
@given(sizes=st.tuples(*[st.integers(0, 3)] * 3), kept=st.tuples(*[st.booleans()] * 3))
def test_check_splits_fails_exactly_when_a_split_has_no_row(sizes, kept):
    data = build_params(yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))).data
    splits = {name: ["example"] * n for name, n in zip(SPLITS, sizes)}
    rows = {name: splits[name] if keep else [] for name, keep in zip(SPLITS, kept)}
    empty = [name for name in SPLITS if not rows[name]]
    if not empty:
        check_splits(splits, rows, data, Path("data/prepared"))
        return
    with pytest.raises(DataError) as err:
        check_splits(splits, rows, data, Path("data/prepared"))
    assert [p.split(":")[0] for p in err.value.problems] == [
        f"data/prepared/{name}.parquet" for name in empty]
    for name, problem in zip(empty, err.value.problems):
        setting = ("data.max_seq_length" if splits[name] else
                   "data.val_fraction" if name in ("train", "val") else "data.test_fraction")
        assert setting in problem, problem


# ------------------------------------------------------------------ split

def test_exact_split_of_a_small_fixture(tmp_path, tokenizer_dir, monkeypatch):
    ws = workspace(tmp_path, {"qa.jsonl": "\n".join(qa_lines(12)) + "\n"},
                   [{"path": "data/raw/qa.jsonl", "format": "alpaca"}], tokenizer_dir)
    assert prepare(ws, monkeypatch) == 0
    got = {s: sorted((r["record_id"] for r in split), key=lambda i: int(i[3:]))
           for s, split in all_rows(ws).items()}
    assert got == EXPECTED_SPLIT
    # the documented rule, re-computed here: sha256("user: " + prompt) / 2^256
    for split, ids in got.items():
        for rid in ids:
            b = int(hashlib.sha256(f"user: Question number {rid[3:]} about the kidney?"
                                   .encode()).hexdigest(), 16) / 2 ** 256
            assert split == ("test" if b < 0.25 else "val" if b < 0.5 else "train")


# buckets: qa-0 .016, 1 .283, 2 .134, 3 .128, 4 .146, 5 .198, 6 .517, 7 .786, 8 .907, 9 .510,
# 10 .005, 11 .079 (12 records are few: 7 of them fall below 0.25)
EXPECTED_SPLIT = {"train": ["qa-6", "qa-7", "qa-8", "qa-9"], "val": ["qa-1"],
                  "test": ["qa-0", "qa-2", "qa-3", "qa-4", "qa-5", "qa-10", "qa-11"]}


def test_adding_and_removing_records_moves_no_other_record(tmp_path, tokenizer_dir, monkeypatch):
    lines = qa_lines(30)
    first = workspace(tmp_path / "a", {"qa.jsonl": "\n".join(lines[:20]) + "\n"},
                      [{"path": "data/raw/qa.jsonl", "format": "alpaca"}], tokenizer_dir)
    assert prepare(first, monkeypatch) == 0
    before = {r["id"]: s for s, split in all_rows(first).items() for r in split}
    changed = lines[25:] + lines[3:20] + lines[20:25]  # 10 added, 0-2 removed, order changed
    second = workspace(tmp_path / "b", {"qa.jsonl": "\n".join(changed) + "\n"},
                       [{"path": "data/raw/qa.jsonl", "format": "alpaca"}], tokenizer_dir)
    assert prepare(second, monkeypatch) == 0
    after = {r["id"]: s for s, split in all_rows(second).items() for r in split}
    common = set(before) & set(after)
    assert len(common) == 17
    assert {i: before[i] for i in common} == {i: after[i] for i in common}


# ------------------------------------------------------------------ masks and templates

def test_labels_are_masked_exactly_on_the_prompt(tmp_path, tokenizer_dir, tokenizer, monkeypatch):
    ws = bad_workspace(tmp_path, tokenizer_dir, on_invalid="skip")
    assert prepare(ws, monkeypatch) == 0
    checked = 0
    for split in all_rows(ws).values():
        for row in split:
            prompt_ids = tokenizer(row["prompt"])["input_ids"]  # as inference tokenises it
            answer_ids = tokenizer(row["reference"], add_special_tokens=False)["input_ids"]
            n = len(prompt_ids)
            assert row["input_ids"][:n] == prompt_ids
            assert row["labels"][:n] == [-100] * n
            assert row["labels"][n:] == row["input_ids"][n:] and -100 not in row["labels"][n:]
            if row["record_id"] == "a9":  # truncated: the answer's first tokens, no eos
                assert row["input_ids"][n:] == answer_ids[:128 - n]
            else:
                assert row["input_ids"][n:] == answer_ids + [tokenizer.eos_token_id]
            assert row["length"] == len(row["input_ids"])
            checked += 1
    assert checked == 4


# ------------------------------------------------------------------ formats

def test_csv_parquet_chat_sharegpt_and_field_mapping(tmp_path, tokenizer_dir, monkeypatch):
    import pyarrow as pa
    files = {name: (FIXTURES / "raw" / name).read_bytes()
             for name in ("qa.csv", "chat.jsonl", "mcq.json")}
    ws = workspace(tmp_path, files, [
        {"path": "data/raw/qa.csv", "format": "alpaca",
         "fields": {"instruction": "question_text", "input": "context", "output": "response"}},
        {"path": "data/raw/chat.jsonl", "format": "chat"},
        {"path": "data/raw/mcq.json", "format": "mcq", "fields": {"question": "q", "options": "choices"}},
        {"path": "data/raw/p.parquet", "format": "alpaca", "fields": {"output": "answer"}},
    ], tokenizer_dir, on_invalid="skip", val_fraction=0.15, test_fraction=0.3)
    pq.write_table(pa.table({"instruction": ["Define shock."], "answer": ["Circulatory failure."]}),
                   ws / "data" / "raw" / "p.parquet")
    assert prepare(ws, monkeypatch) == 0
    # buckets: parquet row .238 and chat-1 .246 -> test; csv-1 .421 -> val; the rest train
    splits = {r["record_id"] or r["source"]: name for name, split in all_rows(ws).items()
              for r in split}
    assert splits == {"data/raw/p.parquet:row 1": "test", "chat-1": "test", "csv-1": "val",
                      "csv-2": "train", "chat-2": "train", "mcq-1": "train", "mcq-2": "train"}
    train = {r["record_id"] or r["source"]: r for split in all_rows(ws).values() for r in split}
    rejects = [json.loads(x) for x in (ws / "data/prepared/rejects.jsonl").read_text().splitlines()]
    assert [(r["source"], r["reason"]) for r in rejects] == [
        ("data/raw/qa.csv:5", "missing_field"), ("data/raw/chat.jsonl:3", "invalid_messages"),
        ("data/raw/mcq.json:8", "invalid_answer")]
    assert sorted(train) == ["chat-1", "chat-2", "csv-1", "csv-2", "data/raw/p.parquet:row 1",
                             "mcq-1", "mcq-2"]
    assert train["csv-2"]["source"] == "data/raw/qa.csv:3"
    assert train["data/raw/p.parquet:row 1"]["reference"] == "Circulatory failure."
    mcq1, mcq2 = train["mcq-1"], train["mcq-2"]
    assert mcq1["prompt"].endswith("Which electrolyte mainly sets extracellular osmolality?\n"
                                   "A. Calcium\nB. Sodium\nC. Potassium\nD. Magnesium\n\n### Response:\n")
    assert (mcq1["reference"], mcq1["label"]) == ("Answer: B. Sodium is the main extracellular cation.", "B")
    assert (mcq2["reference"], mcq2["label"]) == ("Réponse : A. L'adrénaline intramusculaire", "A")
    assert json.loads(mcq1["options"])["B"] == "Sodium"
    assert train["chat-1"]["prompt"].startswith("You are a careful clinician.\n\n### Instruction:\n")
    assert train["chat-2"]["prompt"].endswith("### Response:\nLife-threatening organ dysfunction caused "
                                              "by a dysregulated host response to infection.\n\n"
                                              "### Instruction:\nAnd septic shock?\n\n### Response:\n")
    assert {r["kind"] for r in train.values()} == {"qa", "chat", "mcq"}


# ------------------------------------------------------------------ PHI

PHI_LINES = qa_lines(1) + [QA.format(id="p", q="Who to call?",
                                     a="Write to jean.dupont@chu-lyon.fr or call 06 12 34 56 78.")]


def test_phi_error_names_file_line_and_kinds_never_the_value(tmp_path, tokenizer_dir):
    ws = workspace(tmp_path, {"phi.jsonl": "\n".join(PHI_LINES) + "\n"},
                   [{"path": "data/raw/phi.jsonl", "format": "alpaca"}], tokenizer_dir)
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "prepare.py"), "--out",
                           "data/prepared", "--metrics", "metrics/prepare.json"],
                          cwd=ws, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "data/raw/phi.jsonl:2: looks like a personal identifier (email, phone)" in proc.stderr
    for value in ("jean.dupont", "chu-lyon", "06 12 34 56 78", "12 34 56"):
        assert value not in proc.stderr + proc.stdout
    assert not (ws / "data" / "prepared").exists() and not (ws / "metrics").exists()


def test_phi_redact_replaces_and_counts(tmp_path, tokenizer_dir, monkeypatch):
    lines = PHI_LINES + qa_lines(11, start=1)  # qa-0..11 fill every split (EXPECTED_SPLIT)
    ws = workspace(tmp_path, {"phi.jsonl": "\n".join(lines) + "\n"},
                   [{"path": "data/raw/phi.jsonl", "format": "alpaca"}], tokenizer_dir,
                   phi="redact")
    assert prepare(ws, monkeypatch) == 0
    metrics = json.loads((ws / "metrics" / "prepare.json").read_text())
    assert metrics["phi"] == {"email": 1, "phone": 1, "nir": 0, "ssn": 0, "dob": 0, "mrn": 0, "name": 0}
    redacted = [r for split in all_rows(ws).values() for r in split if r["record_id"] == "p"][0]
    assert redacted["reference"] == "Write to [EMAIL] or call [PHONE]."


# ------------------------------------------------------------------ packing

def test_packing_resets_positions_and_never_splits_an_example(tmp_path, tokenizer_dir, monkeypatch):
    ws = workspace(tmp_path, {"qa.jsonl": "\n".join(qa_lines(24)) + "\n"},
                   [{"path": "data/raw/qa.jsonl", "format": "alpaca"}], tokenizer_dir,
                   packing=True, val_fraction=0.1, test_fraction=0.1, max_seq_length=256)
    assert prepare(ws, monkeypatch) == 0
    train = {r["id"]: r for r in rows(ws, "train")}
    packed = pq.read_table(ws / "data" / "prepared" / "train_packed.parquet").to_pylist()
    assert 0 < len(packed) < len(train)
    assert Counter(i for row in packed for i in row["ids"]) == Counter(list(train))  # each once
    for row in packed:
        assert len(row["input_ids"]) == len(row["labels"]) == sum(row["seq_lens"]) <= 256
        assert row["position_ids"] == [p for n in row["seq_lens"] for p in range(n)]
        start = 0
        for rid, n in zip(row["ids"], row["seq_lens"]):
            assert row["input_ids"][start:start + n] == train[rid]["input_ids"]
            assert row["labels"][start:start + n] == train[rid]["labels"]
            start += n
    metrics = json.loads((ws / "metrics" / "prepare.json").read_text())
    assert metrics["packed_rows"] == len(packed)


# ------------------------------------------------------------------ the embedded dataset

@pytest.mark.slow
def test_embedded_dataset_passes_with_phi_error(tmp_path, tokenizer_dir, monkeypatch):
    raw = sorted((ROOT / "data" / "raw").glob("*.jsonl"))
    if not raw:
        pytest.fail("data/raw missing: run `make data`")
    files = {p.name: p.read_bytes() for p in raw}
    ws = workspace(tmp_path, files, [
        {"path": "data/raw/qa.jsonl", "format": "alpaca"},
        {"path": "data/raw/labs.jsonl", "format": "alpaca"},
        {"path": "data/raw/mcq.jsonl", "format": "mcq"}], tokenizer_dir,
        max_seq_length=256, val_fraction=0.1, test_fraction=0.1)
    assert prepare(ws, monkeypatch) == 0
    metrics = json.loads((ws / "metrics" / "prepare.json").read_text())
    lines = sum(1 for p in raw for line in p.read_text().splitlines() if line.strip())
    assert (metrics["records_in"], metrics["rejected"], metrics["leakage"]) == (lines, 0, 0)
    assert set(metrics["phi"].values()) == {0}
    assert metrics["kinds"]["lab"] > 0 and metrics["kinds"]["mcq"] > 0


def test_heldout_sources_are_scored_never_split_and_deduplicated_against_sources(
        tmp_path, tokenizer_dir, monkeypatch):
    """data.heldout_sources: every record lands in heldout.parquet, none in train/val/test; a
    held-out record equal to a source record is dropped (it would be recall); the split of the
    sources is exactly what it is without them; prepare reports the held-out overlap."""
    held = qa_lines(3, start=100) + [qa_lines(1, start=6)[0]]   # qa-6 is also a source record
    ws = workspace(tmp_path, {"qa.jsonl": "\n".join(qa_lines(12)) + "\n",
                              "heldout/novel.jsonl": "\n".join(held) + "\n"},
                   [{"path": "data/raw/qa.jsonl", "format": "alpaca"}], tokenizer_dir,
                   heldout_sources=[{"path": "data/raw/heldout/novel.jsonl", "format": "alpaca"}])
    assert prepare(ws, monkeypatch) == 0
    got = {s: sorted((r["record_id"] for r in split), key=lambda i: int(i[3:]))
           for s, split in all_rows(ws).items()}
    assert got == EXPECTED_SPLIT
    assert [r["record_id"] for r in rows(ws, "heldout")] == ["qa-100", "qa-101", "qa-102"]
    metrics = json.loads((ws / "metrics" / "prepare.json").read_text(encoding="utf-8"))
    assert metrics["splits"] == {"train": 4, "val": 1, "test": 7, "heldout": 3}
    assert metrics["records_in"] == 16 and metrics["duplicates"] == 1
    heldout = metrics["contamination"]["heldout"]
    assert heldout["items"] == 3 and heldout["prompt"]["items"] == 3
    # "user: Question number 10x about the kidney?" is 7 words: no 8-gram, nothing shared
    assert heldout["prompt"]["max_overlap"] == 0.0
