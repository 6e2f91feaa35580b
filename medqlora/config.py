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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schema" / "params.schema.json"
SECTIONS = ("seed", "data", "model", "quantization", "lora", "train", "evaluate", "merge",
            "package", "runner")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ParamsError(ValueError):
    """Every problem found in a params file, one `key.path: message` per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# ---------------------------------------------------------------- typed settings
# Field meanings live in the schema's descriptions (one source of truth); these classes give
# the stages attribute access and types. Defaults are filled from the schema before building.

@dataclass(frozen=True)
class Source:
    path: str
    format: str
    fields: dict[str, str]


@dataclass(frozen=True)
class DataParams:
    sources: tuple[Source, ...]
    on_invalid: str
    max_errors_reported: int
    val_fraction: float
    test_fraction: float
    max_seq_length: int
    overlength: str
    packing: bool
    system_prompt: str
    phi: str
    on_contamination: str
    contamination_threshold: float


@dataclass(frozen=True)
class ModelParams:
    base: str
    revision: str | None
    trust_remote_code: bool
    attn_implementation: str

    @property
    def is_local(self) -> bool:
        """True when `base` is a folder on disk rather than a hub id."""
        return Path(self.base).is_dir()


@dataclass(frozen=True)
class QuantizationParams:
    load_in_4bit: bool
    bnb_4bit_quant_type: str
    bnb_4bit_use_double_quant: bool
    bnb_4bit_compute_dtype: str
    bnb_4bit_quant_storage: str


@dataclass(frozen=True)
class LoraParams:
    r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: tuple[str, ...] | str
    bias: str
    use_rslora: bool
    use_dora: bool


@dataclass(frozen=True)
class FastPathParams:
    """train.fast_path: the switches of medqlora/fastpath.py (meanings in the schema)."""
    enabled: str
    fused_kernels: bool
    fused_cross_entropy: bool
    fused_lora: bool
    frozen_in_compute_dtype: bool
    padding_free: bool
    checkpoint_policy: str
    fused_optimizer: bool


@dataclass(frozen=True)
class TrainParams:
    num_train_epochs: float
    max_steps: int
    per_device_train_batch_size: int
    per_device_eval_batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    lr_scheduler_type: str
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    optim: str
    mixed_precision: str
    gradient_checkpointing: bool
    logging_steps: int
    eval_steps: int
    save_steps: int
    save_total_limit: int
    early_stopping_patience: int
    early_stopping_threshold: float
    adaptive_batch_size: bool
    init_adapter: str | None
    memory_budget_gib: float | None
    fast_path: FastPathParams


@dataclass(frozen=True)
class BenchmarkParams:
    """evaluate.benchmarks[i]: one lm-evaluation-harness task on a local public file."""
    task: str
    path: str
    fewshot_path: str | None
    num_fewshot: int
    limit: int | None


@dataclass(frozen=True)
class EvaluateParams:
    max_examples: int | None
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    batch_size: int
    bootstrap_samples: int
    compare_base: bool
    benchmarks: tuple[BenchmarkParams, ...]


@dataclass(frozen=True)
class MergeParams:
    enabled: bool
    into: str
    parity_prompts: int
    max_abs_logit_diff: float
    min_top1_agreement: float
    requantize: bool
    max_shard_size: str


@dataclass(frozen=True)
class PackageParams:
    name: str
    include_merged: bool
    license: str


@dataclass(frozen=True)
class DistributedParams:
    num_processes: int
    num_machines: int
    machine_rank: int
    main_process_ip: str | None
    main_process_port: int
    strategy: str
    keep_effective_batch: bool


@dataclass(frozen=True)
class RunnerParams:
    backend: str
    image: str | None
    gpus: str | int | tuple[str, ...]
    shm_size: str
    env: tuple[str, ...]
    mounts: tuple[str, ...]
    network: str
    distributed: DistributedParams


@dataclass(frozen=True)
class Params:
    seed: int
    data: DataParams
    model: ModelParams
    quantization: QuantizationParams
    lora: LoraParams
    train: TrainParams
    evaluate: EvaluateParams
    merge: MergeParams
    package: PackageParams
    runner: RunnerParams
    raw: dict[str, Any]  # the validated mapping with defaults filled, for meta.json

    def section(self, *names: str) -> dict[str, Any]:
        """The resolved values of some sections, e.g. what a stage records in meta.json."""
        return {name: self.raw[name] for name in names}


# ---------------------------------------------------------------- loading

def load_schema() -> dict[str, Any]:
    """The params JSON Schema shipped with the project."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""


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
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError([f"{path}: file not found"]) from None
    except UnicodeDecodeError as err:
        raise ParamsError([f"{path}: not UTF-8 text ({err.reason} at byte {err.start})"]) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ParamsError([f"{where}: invalid YAML: {err.problem or err.context}"]) from None
    except yaml.YAMLError as err:
        raise ParamsError([f"{path}: invalid YAML: {err}"]) from None


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


def _describe(error, schema: dict) -> list[str]:
    """Turn one jsonschema error into user-facing `path: message` lines."""
    where = list(error.absolute_path)
    if error.validator == "additionalProperties":
        known = sorted(_schema_at(schema, where).get("properties", {}))
        lines = []
        for key in sorted(set(error.instance) - set(known)):
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(known)})"
            lines.append(f"{key_path(where + [key])}: unknown key{hint}")
        return lines
    if error.validator == "required":
        missing = re.match(r"'([^']+)' is a required property", error.message)
        name = missing.group(1) if missing else error.message
        return [f"{key_path(where + [name])}: required key is missing"]
    if error.validator == "oneOf" and error.context:
        # Report the branch closest to the value's type rather than "not valid under any".
        best = min(error.context, key=lambda e: (e.validator == "type", len(e.message)))
        return [f"{key_path(where)}: {best.message}"]
    return [f"{key_path(where)}: {error.message}"]


def _mapping(node: Any, *keys: str) -> dict[str, Any]:
    """node[k1][k2]... when every level is a mapping, else {} (the schema reports the rest)."""
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
    sources = data.get("sources")
    for i, source in enumerate(sources if isinstance(sources, list) else []):
        if isinstance(source, dict) and isinstance(source.get("path"), str):
            if not (root / source["path"]).is_file():
                problems.append(f"data.sources[{i}].path: {source['path']} not found "
                                f"(relative to {root})")
    problems.extend(_benchmark_rules(_mapping(doc, "evaluate").get("benchmarks"), root))
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
    """Several processes (medqlora/launch.py): what must agree with runner.distributed."""
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
    validator = Draft202012Validator(schema)
    problems = []
    for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        problems.extend(_describe(error, schema))
    problems.extend(_cross_field(doc, root))
    return list(dict.fromkeys(problems))  # stable de-duplication


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
    data["sources"] = [Source(s["path"], s["format"], dict(s.get("fields", {})))
                       for s in data["sources"]]
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
