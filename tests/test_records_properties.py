"""Property tests of the record parser (hypothesis): nothing a raw file holds makes it crash.

Whatever bytes, lines or JSON values a source file contains, reading it yields Examples and
Rejects whose message is `file:line: reason`, or raises DataError whose every problem names
the file; any other exception is a bug.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medqlora.core.config import Source
from medqlora.data.records import DataError, Example, Reject, read_records

FORMATS = ("alpaca", "mcq", "chat")
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=5),
    max_leaves=12)
# Records close to valid ones, so the validators' deeper branches run, not just "not an object".
keys = st.sampled_from(["instruction", "input", "output", "label", "lang", "id", "question",
                        "options", "answer", "explanation", "messages", "conversations", "role",
                        "content", "from", "value"])
near_records = st.dictionaries(keys, json_values | st.lists(
    st.dictionaries(keys, json_values, max_size=3), max_size=3), max_size=6)


def read_all(name: str, data: bytes, fmt: str) -> list:
    """Read one file of `data`; assert the only failure is a DataError naming the file."""
    with tempfile.TemporaryDirectory() as root:
        (Path(root) / name).write_bytes(data)
        try:
            out = list(read_records(Source(name, fmt, {}), root))
        except DataError as err:
            assert err.problems and all(p.startswith(f"{name}:") for p in err.problems)
            return []
    for item in out:
        assert isinstance(item, (Example, Reject))
        if isinstance(item, Reject):
            assert re.match(rf"^{re.escape(name)}:\d+: \S", str(item)), str(item)
            assert item.reason and item.message
        else:
            assert re.match(rf"^{re.escape(name)}:\d+$", item.source)
    return out


@SETTINGS
@given(data=st.binary(max_size=300), fmt=st.sampled_from(FORMATS),
       suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_arbitrary_bytes(data, fmt, suffix):
    read_all("raw" + suffix, data, fmt)


@SETTINGS
@given(lines=st.lists(st.text(max_size=40), max_size=8), fmt=st.sampled_from(FORMATS),
       suffix=st.sampled_from([".jsonl", ".csv"]))
def test_arbitrary_text_lines(lines, fmt, suffix):
    read_all("raw" + suffix, "\n".join(lines).encode("utf-8", "surrogatepass"), fmt)


@SETTINGS
@given(values=st.lists(json_values | near_records, min_size=1, max_size=6),
       fmt=st.sampled_from(FORMATS))
def test_arbitrary_json_values_one_per_line(values, fmt):
    data = "\n".join(json.dumps(v) for v in values).encode()
    out = read_all("raw.jsonl", data, fmt)
    # one result per line: nothing is silently dropped
    assert len(out) == len(values)


@SETTINGS
@given(values=st.lists(json_values | near_records, max_size=6), fmt=st.sampled_from(FORMATS))
def test_arbitrary_json_list(values, fmt):
    out = read_all("raw.json", json.dumps(values, indent=1).encode(), fmt)
    assert len(out) == len(values)


@SETTINGS
@given(rows=st.lists(st.dictionaries(keys, st.text(max_size=15) | json_values.map(json.dumps),
                                     max_size=5), max_size=5), fmt=st.sampled_from(FORMATS))
def test_csv_rows_of_arbitrary_cells(rows, fmt):
    import csv
    import io
    header = sorted({k for row in rows for k in row}) or ["instruction"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for row in rows:
        writer.writerow([row.get(k, "") for k in header])
    read_all("raw.csv", buffer.getvalue().encode("utf-8", "surrogatepass"), fmt)


def test_deeply_nested_json_line_is_a_record_error():
    # 100,000 nested lists exceed Python's recursion limit inside json.loads
    out = read_all("raw.jsonl", b"[" * 100_000 + b"\n" + json.dumps(
        {"instruction": "q", "output": "a"}).encode(), "alpaca")
    assert isinstance(out[0], Reject) and isinstance(out[1], Example)


def test_deeply_nested_json_list_element_is_a_file_error():
    assert read_all("raw.json", b"[" + b"[" * 100_000, "alpaca") == []
