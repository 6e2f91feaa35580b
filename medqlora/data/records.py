"""Read raw record files and validate each record, naming `file:line` for every problem.

    for item in read_records(source):          # Example (valid) or Reject (why not)
        ...

Files: JSONL (one object a line), JSON (a list of objects), CSV (header row) and Parquet.
"Line" is the physical line: JSONL and JSON the line the object starts on, CSV the line the
row starts on (the header is line 1), Parquet the row index + 1, written `path:row N`.
Formats (`data.sources[].format`), our field names (`fields` maps them to the source's):
  alpaca  instruction, input (optional), output, label (optional: a lab finding), lang, id
  chat    messages [{role, content}] or ShareGPT conversations [{from, value}]; the last turn
          is the assistant's answer, everything before it the prompt
  mcq     question, options ({"A": ...} or a list), answer (a letter), explanation (optional)
A file that cannot be read at all (not JSON, unreadable Parquet) raises DataError: its records
cannot be counted, so skipping them would be a silent drop. Text files are UTF-8; a leading
byte-order mark (spreadsheet exports write one) is skipped.
A Reject carries a reason kind (counted in metrics) and a message; never the record's text.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from medqlora.core.config import Source

ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "system": "system", "model": "assistant", "bot": "assistant"}


class DataError(RuntimeError):
    """Problems that stop prepare; one `file:line: problem` per entry."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Reject:
    """A record that is not used, with where it is and why (no record text)."""
    source: str   # "path:line"
    reason: str   # kind, e.g. "empty_field"
    message: str  # e.g. "output is empty"

    def __str__(self) -> str:
        return f"{self.source}: {self.message}"


@dataclass
class Example:
    """One valid record in our shape (texts not yet normalised)."""
    source: str
    kind: str                                # qa | lab | mcq | chat
    messages: list[dict[str, str]]           # the prompt turns, ending with a user turn
    reference: str                           # the answer text
    label: str | None = None
    options: dict[str, str] | None = None
    lang: str | None = None
    record_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # mcq answer letter, explanation


class _Invalid(Exception):
    def __init__(self, reason: str, message: str):
        self.reason, self.message = reason, message


# ---------------------------------------------------------------- reading files

def _read_bytes(path: Path) -> bytes:
    """The file's bytes without a UTF-8 byte-order mark (it would break the first record)."""
    data = path.read_bytes()
    return data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data


def _line_of(data: bytes | str, offset: int) -> int:
    newline = b"\n" if isinstance(data, bytes) else "\n"
    return data.count(newline, 0, offset) + 1


def _read_jsonl(path: Path, shown: str) -> Iterator[tuple[int, Any]]:
    """(line, object-or-_Invalid) for each non-blank line."""
    for number, raw in enumerate(_read_bytes(path).split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield number, _Invalid("not_utf8", f"not UTF-8 text (byte {err.start + 1} of the "
                                               "line); re-encode the file as UTF-8")
            continue
        try:
            yield number, json.loads(text)
        except json.JSONDecodeError as err:
            yield number, _Invalid("invalid_json", f"broken JSON ({err.msg} at column {err.colno})")
        except RecursionError:  # found by hypothesis: thousands of nested brackets
            yield number, _Invalid("invalid_json", "JSON nested too deeply to read")


def _read_json(path: Path, shown: str) -> Iterator[tuple[int, Any]]:
    """A JSON list: each element with the line it starts on."""
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError([f"{shown}:{_line_of(data, err.start)}: not UTF-8 text; re-encode the "
                         "file as UTF-8 (a JSON file is read whole)"]) from None
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text[pos:pos + 1] == "[":
        raise DataError([f"{shown}:{_line_of(text, pos)}: a .json source must be a list of "
                         "records (use .jsonl for one record per line)"])
    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError([f"{shown}:{err.lineno}: broken JSON ({err.msg} at column "
                             f"{err.colno}); the records after it cannot be read"]) from None
        except RecursionError:
            raise DataError([f"{shown}:{_line_of(text, pos)}: JSON nested too deeply to read; "
                             "the records after it cannot be read"]) from None
        yield _line_of(text, pos), obj
        pos = end


def _read_csv(path: Path, shown: str) -> Iterator[tuple[int, Any]]:
    """Rows as dicts of non-empty cells (an empty cell is an absent optional field)."""
    text = _read_bytes(path).decode("utf-8", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        return
    start = reader.line_num + 1
    for row in reader:
        line, start = start, reader.line_num + 1
        if not any(cell.strip() for cell in row):
            continue
        if any("\udc80" <= ch <= "\udcff" for cell in row for ch in cell):
            yield line, _Invalid("not_utf8", "not UTF-8 text; re-encode the file as UTF-8")
            continue
        if len(row) != len(header):
            yield line, _Invalid("invalid_csv", f"{len(row)} cells for {len(header)} columns")
            continue
        yield line, {k: _csv_value(v) for k, v in zip(header, row) if v.strip()}


def _csv_value(cell: str) -> Any:
    """JSON-looking cells (options, messages) are parsed; everything else stays text."""
    stripped = cell.strip()
    if stripped[:1] in "[{":
        try:
            return json.loads(stripped)
        except (json.JSONDecodeError, RecursionError):
            return cell
    return cell


def _read_parquet(path: Path, shown: str) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        raise DataError([f"{shown}: unreadable Parquet ({type(err).__name__})"]) from None
    for index, row in enumerate(rows):
        yield index + 1, {k: v for k, v in row.items() if v is not None}


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
           ".parquet": _read_parquet}


def where(path: str | Path, line: int) -> str:
    """`path:line`, or `path:row N` for Parquet (no physical lines)."""
    return f"{path}:row {line}" if str(path).endswith(".parquet") else f"{path}:{line}"


# ---------------------------------------------------------------- validating records

def _text(rec: dict, name: str, *, required: bool = True) -> str | None:
    """A text field: missing / null / empty / not text are each their own reason."""
    if name not in rec or rec[name] is None:
        if required:
            raise _Invalid("missing_field", f"{name} is missing")
        return None
    value = rec[name]
    if not isinstance(value, str):
        raise _Invalid("wrong_type", f"{name} must be text, got {_type(value)}")
    if required and not value.strip():
        raise _Invalid("empty_field", f"{name} is empty")
    return value


def _type(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _alpaca(rec: dict, source: str) -> Example:
    instruction = _text(rec, "instruction")
    context = _text(rec, "input", required=False) or ""
    output = _text(rec, "output")
    label = _text(rec, "label", required=False)
    user = f"{instruction}\n\n{context}" if context.strip() else instruction
    return Example(source, "lab" if label and label.strip() else "qa",
                   [{"role": "user", "content": user}], output,
                   label=label.strip() if label and label.strip() else None)


def _options(value: Any) -> dict[str, str]:
    if isinstance(value, list):
        value = {chr(ord("A") + i): v for i, v in enumerate(value)}
    if not isinstance(value, dict):
        raise _Invalid("wrong_type", f"options must be an object or a list, got {_type(value)}")
    if len(value) < 2:
        raise _Invalid("invalid_options", f"options has {len(value)} choice(s); at least 2")
    out = {}
    for letter, text in value.items():
        if not isinstance(text, str) or not text.strip():
            raise _Invalid("invalid_options", f"option {letter} is empty or not text")
        out[str(letter).strip().upper()] = text
    return out


def _mcq(rec: dict, source: str) -> Example:
    question = _text(rec, "question")
    if "options" not in rec or rec["options"] is None:
        raise _Invalid("missing_field", "options is missing")
    options = _options(rec["options"])
    answer = _text(rec, "answer")
    letter = answer.strip().rstrip(".)").upper()
    if letter not in options:
        got = repr(answer) if len(answer) <= 3 else f"a {len(answer)}-character value"
        raise _Invalid("invalid_answer", f"answer must be one of the option letters "
                                         f"{', '.join(options)} (got {got})")
    explanation = _text(rec, "explanation", required=False)
    return Example(source, "mcq", [{"role": "user", "content": question}], "",
                   label=letter, options=options,
                   extra={"explanation": explanation or ""})


def _chat(rec: dict, source: str) -> Example:
    turns = rec.get("messages", rec.get("conversations"))
    if turns is None:
        raise _Invalid("missing_field", "messages is missing (or ShareGPT conversations)")
    if not isinstance(turns, list) or not turns:
        raise _Invalid("wrong_type", "messages must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _Invalid("wrong_type", f"messages[{i}] must be an object")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(role, str) or role not in ROLES:  # a list role is unhashable
            raise _Invalid("invalid_messages", f"messages[{i}] role must be one of "
                                               f"{', '.join(sorted(ROLES))}")
        if not isinstance(content, str):
            raise _Invalid("wrong_type", f"messages[{i}] content must be text")
        if not content.strip():
            raise _Invalid("empty_field", f"messages[{i}] content is empty")
        messages.append({"role": ROLES[role], "content": content})
    if messages[-1]["role"] != "assistant":
        raise _Invalid("invalid_messages", "the last turn must be the assistant's answer")
    if not any(m["role"] == "user" for m in messages[:-1]):
        raise _Invalid("invalid_messages", "no user turn before the answer")
    return Example(source, "chat", messages[:-1], messages[-1]["content"])


VALIDATORS = {"alpaca": _alpaca, "mcq": _mcq, "chat": _chat}


def to_example(obj: Any, fmt: str, fields: dict[str, str], source: str) -> Example | Reject:
    """Validate one decoded record of format `fmt`; a Reject says why it is unusable."""
    if isinstance(obj, _Invalid):
        return Reject(source, obj.reason, obj.message)
    if not isinstance(obj, dict):
        return Reject(source, "not_an_object", f"a record must be an object, got {_type(obj)}")
    rec = dict(obj)
    for ours, theirs in fields.items():  # {output: response}: read our `output` from `response`
        rec.pop(ours, None)
        if theirs in obj:
            rec[ours] = obj[theirs]
    try:
        example = VALIDATORS[fmt](rec, source)
        lang = _text(rec, "lang", required=False)
    except _Invalid as err:
        return Reject(source, err.reason, err.message)
    example.lang = lang.strip() if lang and lang.strip() else None
    example.record_id = str(rec["id"]) if rec.get("id") is not None else None
    return example


def read_records(source: Source, root: str | Path = ".") -> Iterator[Example | Reject]:
    """Every record of one source, in file order, as an Example or a Reject."""
    path = Path(root) / source.path
    suffix = path.suffix.lower()
    if path.is_dir():
        raise DataError([f"{source.path}: is a directory; data.sources takes files: list each "
                         "file in it as its own source"])
    if not path.is_file():
        raise DataError([f"{source.path}: file not found (data.sources path)"])
    for line, obj in READERS[suffix](path, source.path):
        yield to_example(obj, source.format, source.fields, where(source.path, line))
