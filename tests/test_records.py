"""Reading and validating raw records (medqlora.data.records), PHI patterns and prompt templates."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from medqlora.core.config import Source
from medqlora.data import phi
from medqlora.data.records import DataError, Example, Reject, read_records
from medqlora.data.templates import DEFAULT_NAME, format_messages, format_prompt, template_name

FIXTURES = Path(__file__).parent / "fixtures"


def records(path, fmt, fields=None, root=FIXTURES):
    return list(read_records(Source(str(path), fmt, fields or {}), root))


def test_csv_rows_keep_their_physical_line_and_fields_mapping():
    out = records("raw/qa.csv", "alpaca", {"instruction": "question_text", "input": "context",
                                           "output": "response"})
    # header is line 1; csv-2's quoted input spans lines 3-4, so csv-3 starts on line 5
    assert [str(r) if isinstance(r, Reject) else r.source for r in out] == [
        "raw/qa.csv:2", "raw/qa.csv:3", "raw/qa.csv:5: output is missing"]
    first, second = out[0], out[1]
    assert (first.kind, first.record_id, first.lang) == ("qa", "csv-1", "en")
    assert first.messages == [{"role": "user", "content": "What is anaemia?"}]
    assert first.reference == "Anaemia is a low haemoglobin concentration."
    assert second.messages[0]["content"] == ("Interpret these results:\n\nHemoglobin: 9.1 g/dL "
                                             "(ref: 12.0-16.0)\nFerritin: 8 µg/L (ref: 15-150)")


def test_chat_messages_and_sharegpt_conversations():
    out = records("raw/chat.jsonl", "chat")
    assert isinstance(out[0], Example) and isinstance(out[1], Example)
    assert out[0].messages == [{"role": "system", "content": "You are a careful clinician."},
                               {"role": "user", "content": "What lowers potassium quickly?"}]
    assert out[0].reference.startswith("Insulin with glucose")
    assert [m["role"] for m in out[1].messages] == ["user", "assistant", "user"]
    assert out[1].reference.startswith("Sepsis needing vasopressors")
    assert str(out[2]) == "raw/chat.jsonl:3: the last turn must be the assistant's answer"
    assert out[2].reason == "invalid_messages"


def test_json_list_mcq_with_list_options_lowercase_answer_and_bad_letter():
    out = records("raw/mcq.json", "mcq", {"question": "q", "options": "choices"})
    assert [r.source for r in out] == ["raw/mcq.json:2", "raw/mcq.json:5", "raw/mcq.json:8"]
    assert out[0].options == {"A": "Calcium", "B": "Sodium", "C": "Potassium", "D": "Magnesium"}
    assert (out[0].label, out[1].label, out[1].lang) == ("B", "A", "fr")
    assert out[2].reason == "invalid_answer"
    assert str(out[2]) == "raw/mcq.json:8: answer must be one of the option letters A, B (got 'E')"


def test_parquet_rows_are_numbered_from_one(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"instruction": ["Define shock.", "Define fever."],
                             "output": ["Circulatory failure.", None]}), tmp_path / "x.parquet")
    out = records("x.parquet", "alpaca", root=tmp_path)
    assert out[0].source == "x.parquet:row 1" and out[0].reference == "Circulatory failure."
    assert str(out[1]) == "x.parquet:row 2: output is missing"


def test_each_invalid_jsonl_line_has_its_reason(tmp_path):
    lines = [b'{"instruction": "ok", "output": "fine"}',
             b'{"instruction": "broken", "output": ',
             '{"instruction": "caf\u00e9", "output": "x"}'.encode("latin-1"),
             b'{"instruction": "no output"}',
             b'{"instruction": "empty", "output": "  "}',
             b'{"instruction": "typed", "output": 42}',
             b'["not", "an", "object"]',
             b'',
             b'{"instruction": "label typed", "output": "x", "label": 3}']
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = records("bad.jsonl", "alpaca", root=tmp_path)
    assert isinstance(out[0], Example)
    assert [(r.source, r.reason) for r in out[1:]] == [
        ("bad.jsonl:2", "invalid_json"), ("bad.jsonl:3", "not_utf8"),
        ("bad.jsonl:4", "missing_field"), ("bad.jsonl:5", "empty_field"),
        ("bad.jsonl:6", "wrong_type"), ("bad.jsonl:7", "not_an_object"),
        ("bad.jsonl:9", "wrong_type")]
    assert str(out[5]) == "bad.jsonl:6: output must be text, got a number"
    assert str(out[2]).startswith("bad.jsonl:3: not UTF-8 text (byte 21 of the line)")


def test_unreadable_json_file_is_an_error_not_a_silent_drop(tmp_path):
    (tmp_path / "x.json").write_text('[{"instruction": "a", "output": "b"},\n {"instr', "utf-8")
    with pytest.raises(DataError) as err:
        records("x.json", "alpaca", root=tmp_path)
    assert err.value.problems[0].startswith("x.json:2: broken JSON")


BOM = b"\xef\xbb\xbf"  # UTF-8 byte-order mark, as spreadsheet exports write it


@pytest.mark.parametrize("name, content, fields", [
    ("x.jsonl", b'{"id": "r1", "instruction": "Define shock.", "output": "Circulatory failure."}\n'
                b'{"id": "r2", "instruction": "Define fever.", "output": "A raised temperature."}\n',
     {}),
    ("x.json", b'[{"id": "r1", "instruction": "Define shock.", "output": "Circulatory failure."},\n'
               b' {"id": "r2", "instruction": "Define fever.", "output": "A raised temperature."}]\n',
     {}),
    ("x.csv", b'id,question,answer\nr1,Define shock.,Circulatory failure.\n'
              b'r2,Define fever.,A raised temperature.\n',
     {"instruction": "question", "output": "answer"}),
])
def test_utf8_byte_order_mark_is_read_as_utf8(tmp_path, name, content, fields):
    (tmp_path / name).write_bytes(BOM + content)
    out = records(name, "alpaca", fields, root=tmp_path)
    assert all(isinstance(r, Example) for r in out), [str(r) for r in out]
    assert [(r.record_id, r.messages[0]["content"], r.reference) for r in out] == [
        ("r1", "Define shock.", "Circulatory failure."),
        ("r2", "Define fever.", "A raised temperature.")]
    first_line = 2 if name.endswith(".csv") else 1  # the mark shifts no line number
    assert [r.source for r in out] == [f"{name}:{first_line}", f"{name}:{first_line + 1}"]


def test_a_directory_source_says_it_is_a_directory(tmp_path):
    (tmp_path / "exports.jsonl").mkdir()
    with pytest.raises(DataError) as err:
        records("exports.jsonl", "alpaca", root=tmp_path)
    assert err.value.problems == ["exports.jsonl: is a directory; data.sources takes files: "
                                  "list each file in it as its own source"]
    with pytest.raises(DataError) as err:
        records("missing.jsonl", "alpaca", root=tmp_path)
    assert err.value.problems == ["missing.jsonl: file not found (data.sources path)"]


@pytest.mark.parametrize("text,kinds", [
    ("Contact: jean.dupont@chu-lyon.fr", ["email"]),
    ("Tél. 06 12 34 56 78 ou +33 6 12 34 56 78", ["phone", "phone"]),
    ("Call +44 20 7946 0958 or (555) 123-4567", ["phone", "phone"]),
    ("NIR 1 85 05 78 006 084 36", ["nir"]),
    ("SSN 123-45-6789", ["ssn"]),
    ("née le 12/03/1950, DOB: 1950-03-12, date of birth March 3, 1950", ["dob"] * 3),
    ("MRN: 12345678, IPP 2023001, dossier n° 2023-00123", ["mrn"] * 3),
    ("Patient: Jean Dupont vu avec Mme Martin, M. Durand et Mr Smith", ["name"] * 4),
    ("K+: 5.9 mmol/L (N: 3.5-5.0), TA 140/90 mmHg, 0.5-1.5 mg/kg", []),
    ("Published 2019-03-01 (Lancet 2019;393:1234-45). IPP 40 mg pendant 8 semaines.", []),
    ("Patient: Homme de 45 ans. M. tuberculosis. The patient has anaemia.", []),
])
def test_phi_kinds(text, kinds):
    assert [h.kind for h in phi.scan(text)] == kinds


def test_phi_redaction_keeps_the_context_words():
    clean, hits = phi.redact("Patient: Jean Dupont, née le 3 mars 1950, mail a.b@c.org")
    assert clean == "Patient: [NAME], née le [DOB], mail [EMAIL]"
    assert [h.kind for h in hits] == ["name", "dob", "email"]


class _NoTemplate:
    chat_template = None


class _ChatTemplate:
    chat_template = "x"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_default_template_and_chat_template():
    tok = _NoTemplate()
    assert format_prompt(tok, "Q?") == "### Instruction:\nQ?\n\n### Response:\n"
    assert format_prompt(tok, "Q?", system="Be brief.") == (
        "Be brief.\n\n### Instruction:\nQ?\n\n### Response:\n")
    turns = [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "a."},
             {"role": "user", "content": "B?"}]
    assert format_messages(tok, turns) == ("### Instruction:\nA?\n\n### Response:\na.\n\n"
                                           "### Instruction:\nB?\n\n### Response:\n")
    assert template_name(tok) == DEFAULT_NAME
    assert format_prompt(_ChatTemplate(), "Q?", system="S") == "<system>S<user>Q?<assistant>"
    assert json.dumps(format_prompt(_ChatTemplate(), "Q?")) == '"<user>Q?<assistant>"'
