"""The prepare stage's work: raw records -> validated, deduplicated, split, tokenised Parquet.

    python stages/prepare.py --out data/prepared --metrics metrics/prepare.json

Steps, in order (each counted in metrics/prepare.json, none silent):
1. read + validate every record of every `data.sources` entry (medqlora.data.records); a source
   that gives no record (empty, blank lines only, or every record invalid) stops the run;
   `data.on_invalid: error` lists every bad record and writes nothing, `skip` writes them to
   rejects.jsonl as {"source": "path:line", "reason": ...} (no record text: it may be PHI);
2. normalise texts: Unicode NFC, runs of spaces/tabs collapsed, lines stripped, at most one
   blank line in a row (newlines are kept: they separate lab values);
3. PHI scan (medqlora.data.phi): `data.phi` error (names file:line and kinds, never the value),
   redact or warn;
4. dedupe on the normalised content (first occurrence wins), counted as `duplicates`;
5. split by hash: bucket = sha256(normalised prompt) / 2^256 in [0, 1); test below
   test_fraction, val below test+val, else train. A record's split depends on its own prompt
   only, so adding or removing records never moves another one, and equal prompts always
   share a split. Leakage check on a looser key (casefolded, punctuation removed): a train
   prompt equal to a held-out one moves to that held-out split and is counted. Contamination:
   the share of each val/test item's word 8-grams (its content only: turns, options, answer;
   no template text) found in train content, reported per split; items above
   data.contamination_threshold are logged (on_contamination: warn) or stop prepare (error);
6. template (medqlora.data.templates.format_prompt) and tokenise prompt and answer separately,
   then concatenate: labels are -100 exactly on the prompt tokens (bos included), the answer
   is followed by eos. Over max_seq_length: truncate cuts the answer (dropped when no answer
   token is left), drop drops;
   each split must keep at least one row (train trains on train, early-stops on val,
   evaluate scores test), or the run stops naming the fraction or length to change;
7. write {train,val,test}.parquet (+ train_packed.parquet, see `pack`), meta.json, and only
   then metrics/prepare.json. Everything is built in a temporary folder renamed on success.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

from medqlora.core.config import DataParams, Params
from medqlora.core.outputs import atomic_dir, atomic_file, write_json
from medqlora.core.provenance import write_meta
from medqlora.data import phi as phi_scan
from medqlora.data.contamination import overlaps
from medqlora.data.records import DataError, Example, Reject, read_records
from medqlora.data.templates import end_of_turn_id, format_messages, template_name

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
HELDOUT = "heldout"   # data.heldout_sources: evaluated only, never split or trained on
ANSWER_WORD = {"fr": "Réponse :"}  # "Answer:" otherwise
IGNORE = -100


# ---------------------------------------------------------------- 1. read

def collect(data: DataParams, root: str | Path = ".", sources=None
            ) -> tuple[list[Example], list[Reject], int]:
    """Valid examples, rejects and the number of records read, over all sources in order
    (`sources`: other files read by the same rules, e.g. data.heldout_sources).

    Raises DataError for files that cannot be read at all, and, with on_invalid=error, for any
    invalid record (all of them listed, up to data.max_errors_reported).
    """
    examples: list[Example] = []
    rejects: list[Reject] = []
    problems: list[str] = []
    for source in data.sources if sources is None else sources:
        before = len(examples), len(rejects)
        try:
            for item in read_records(source, root):
                (rejects if isinstance(item, Reject) else examples).append(item)
        except DataError as err:
            problems.extend(err.problems)
            continue
        problems.extend(_empty_source(source.path, len(examples) - before[0],
                                      len(rejects) - before[1], data.on_invalid))
    if data.on_invalid == "error":
        problems.extend(str(r) for r in rejects)
    if problems:
        raise DataError(_capped(problems, data.max_errors_reported) +
                        ["set data.on_invalid: skip to reject these records and go on"
                         if rejects and data.on_invalid == "error" else
                         "fix the files named above"])
    return examples, rejects, len(examples) + len(rejects)


def _empty_source(path: str, valid: int, invalid: int, on_invalid: str) -> list[str]:
    """A source that gives no usable record is a mistake (a wrong path, a truncated export),
    never a success: the run would silently train on less than was asked for."""
    if valid + invalid == 0:
        return [f"{path}: holds no records (the file is empty or has blank lines only); fill it "
                "or remove it from data.sources"]
    if valid == 0 and on_invalid == "skip":
        return [f"{path}: all {invalid} records are invalid; set data.on_invalid: error to list "
                "them with their reasons"]
    return []


def _capped(problems: list[str], limit: int) -> list[str]:
    extra = len(problems) - limit
    return problems[:limit] + ([f"... and {extra} more"] if extra > 0 else [])


# ---------------------------------------------------------------- 2-3. normalise, PHI

def normalise(text: str) -> str:
    """NFC, spaces/tabs collapsed, each line stripped, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = [re.sub(r"[^\S\n]+", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _map_texts(example: Example, fn) -> None:
    """Apply fn to every text of an example in place (turns, answer, options, explanation)."""
    for message in example.messages:
        message["content"] = fn(message["content"])
    example.reference = fn(example.reference)
    if example.options:
        example.options = {k: fn(v) for k, v in example.options.items()}
    if example.extra.get("explanation"):
        example.extra["explanation"] = fn(example.extra["explanation"])


def apply_phi(examples: list[Example], mode: str, max_errors: int) -> dict[str, int]:
    """Scan every text; count per kind. error: raise naming file:line + kinds; redact: replace
    each value with its placeholder; warn: log file:line + kinds. Values are never logged."""
    counts: Counter = Counter()
    problems = []
    for example in examples:
        kinds: list[str] = []

        def visit(text: str) -> str:
            clean, hits = phi_scan.redact(text)
            kinds.extend(h.kind for h in hits)
            return clean if mode == "redact" else text

        _map_texts(example, visit)
        counts.update(kinds)
        if kinds:
            line = f"{example.source}: looks like a personal identifier ({', '.join(sorted(set(kinds)))})"
            if mode == "error":
                problems.append(line)
            elif mode == "warn":
                log.warning("%s", line)
    if problems:
        raise DataError(_capped(problems, max_errors) +
                        ["remove the identifiers, or set data.phi: redact to replace them"])
    return {kind: counts.get(kind, 0) for kind in phi_scan.PATTERNS}


# ---------------------------------------------------------------- 4. texts, ids, dedupe

def user_text(example: Example) -> str:
    """The last user turn's text; for mcq the question then "A. ...\\nB. ..." options."""
    text = example.messages[-1]["content"]
    if example.kind == "mcq":
        text += "\n" + "\n".join(f"{k}. {v}" for k, v in example.options.items())
    return text


def reference_text(example: Example) -> str:
    """The answer; for mcq "Answer: B. <explanation or option text>" ("Réponse : B. ..." in fr)."""
    if example.kind != "mcq":
        return example.reference
    word = ANSWER_WORD.get((example.lang or "").lower()[:2], "Answer:")
    rest = example.extra.get("explanation") or example.options[example.label]
    return f"{word} {example.label}. {rest}"


def prompt_key(example: Example) -> str:
    """The normalised prompt content (all turns, no template): what the split hashes."""
    turns = example.messages[:-1] + [{"role": "user", "content": user_text(example)}]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in turns)


def content_id(example: Example) -> str:
    """Stable id: sha256 of the normalised content (prompt, answer, label), 16 hex digits."""
    blob = json.dumps([example.kind, prompt_key(example), reference_text(example), example.label],
                      ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def dedupe(examples: list[Example], raw_keys: list[str]) -> tuple[list[Example], dict[str, int]]:
    """First occurrence wins. `exact`: identical raw texts; `normalised`: equal only after
    normalisation (case, spaces, Unicode form)."""
    seen_raw, seen_id, kept = set(), set(), []
    counts = {"exact": 0, "normalised": 0}
    for example, raw in zip(examples, raw_keys):
        cid = content_id(example)
        if cid in seen_id:
            counts["exact" if raw in seen_raw else "normalised"] += 1
            continue
        seen_id.add(cid)
        seen_raw.add(raw)
        kept.append(example)
    return kept, counts


def _raw_key(example: Example) -> str:
    return json.dumps([example.kind, example.messages, example.reference, example.label,
                       example.options, example.extra], ensure_ascii=False, sort_keys=True)


# ---------------------------------------------------------------- 5. split, leakage

def bucket(text: str) -> float:
    """sha256(text) read as a number in [0, 1)."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) / 2 ** 256


def split_of(key: str, val_fraction: float, test_fraction: float) -> str:
    """test below test_fraction, val below test+val, else train (e.g. 0.1/0.1: 10/10/80 %)."""
    b = bucket(key)
    return "test" if b < test_fraction else "val" if b < test_fraction + val_fraction else "train"


def leak_key(key: str) -> str:
    """Looser than the split key: casefolded, punctuation and symbols gone."""
    return " ".join(re.sub(r"[\W_]+", " ", key.casefold()).split())


def assign_splits(examples: list[Example], val_fraction: float,
                  test_fraction: float) -> tuple[dict[str, list[Example]], int]:
    """Hash split, then move train examples whose loose prompt equals a held-out one's to
    that held-out split. Returns the splits and how many were moved (`leakage`)."""
    splits = {name: [] for name in SPLITS}
    held_out: dict[str, str] = {}
    for example in examples:
        name = split_of(prompt_key(example), val_fraction, test_fraction)
        splits[name].append(example)
        if name != "train":
            held_out.setdefault(leak_key(prompt_key(example)), name)
    train, moved = [], 0
    for example in splits["train"]:
        target = held_out.get(leak_key(prompt_key(example)))
        if target:
            splits[target].append(example)
            moved += 1
        else:
            train.append(example)
    splits["train"] = train
    return splits, moved


def content_text(example: Example) -> str:
    """The record's own words: its user and assistant turns, options and answer (the
    explanation for mcq). No prompt template, no system prompt, no "Answer: B." scaffold:
    text every record shares would make any two records overlap."""
    parts = [m["content"] for m in example.messages if m["role"] != "system"]
    parts += list((example.options or {}).values())
    parts.append(example.extra.get("explanation") or example.reference)
    return "\n".join(parts)


def contamination_report(splits: dict[str, list[Example]], data: DataParams,
                         n: int = 8) -> dict[str, Any]:
    """Word n-gram overlap of each held-out item's content with train content.

    Per split: items, how many share at least one n-gram with train, mean and max overlap,
    and how many exceed data.contamination_threshold. Those are logged (warn) or listed by
    file:line in a DataError (error), which writes nothing.
    """
    train = [content_text(e) for e in splits["train"]]
    report: dict[str, Any] = {"ngram": n, "content_only": True,
                              "threshold": data.contamination_threshold}
    flagged = []
    for name in [s for s in ("val", "test", HELDOUT) if s in splits]:
        shares = overlaps([content_text(e) for e in splits[name]], train, n)
        over = [(e, o) for e, o in zip(splits[name], shares) if o > data.contamination_threshold]
        report[name] = _overlap_stats(shares)
        report[name]["over_threshold"] = len(over)
        if name == HELDOUT:   # what recall would need: the prompt's own words seen in train
            prompts = overlaps([prompt_key(e) for e in splits[name]],
                               [prompt_key(e) for e in splits["train"]], n)
            report[name]["prompt"] = _overlap_stats(prompts)
        flagged += [f"{e.source}: {name} item shares {o:.0%} of its {n}-grams with train"
                    for e, o in over]
    if flagged and data.on_contamination == "error":
        raise DataError(_capped(flagged, data.max_errors_reported) + [
            f"{len(flagged)} held-out item(s) overlap train above data.contamination_threshold "
            f"{data.contamination_threshold}: remove or rewrite them, raise the threshold, or "
            "set data.on_contamination: warn"])
    if flagged:
        log.warning("contamination: %d held-out item(s) share more than %.0f%% of their %d-grams "
                    "with train (content only); see metrics/prepare.json", len(flagged),
                    100 * data.contamination_threshold, n)
    return report


def _overlap_stats(shares: list[float]) -> dict[str, Any]:
    return {"items": len(shares), "items_with_overlap": sum(o > 0 for o in shares),
            "mean_overlap": round(sum(shares) / len(shares), 4) if shares else 0.0,
            "max_overlap": round(max(shares, default=0.0), 4)}


def check_splits(splits: dict[str, list], rows: dict[str, list], data: DataParams,
                 out_dir: Path) -> None:
    """Every split must hold at least one row: train trains on train, evaluates and early-stops
    on val, evaluate scores test. An empty one raises DataError naming the setting to change.

    The hash split puts about fraction x records in a held-out split (0.1 x 25 = 2.5), but few
    records scatter: 25 records at 0.1 leave val empty about 7% of the time (0.9^25).
    """
    kept = sum(len(examples) for examples in splits.values())
    problems = []
    for name in SPLITS:
        if rows[name]:
            continue
        if splits[name]:
            why = (f"every record in it ({len(splits[name])}) is longer than "
                   f"data.max_seq_length ({data.max_seq_length}) and was dropped; raise "
                   "data.max_seq_length" +
                   (" or set data.overlength: truncate" if data.overlength == "drop" else
                    " (their prompts alone are longer)"))
        elif name == "train":
            why = (f"all {kept} unique records went to val or test; lower data.val_fraction "
                   f"({data.val_fraction}) and data.test_fraction ({data.test_fraction}), "
                   "or add records")
        else:
            fraction = data.val_fraction if name == "val" else data.test_fraction
            why = (f"none of the {kept} unique records fell in it (data.{name}_fraction: "
                   f"{fraction}, about {fraction * kept:.1f} expected); raise "
                   f"data.{name}_fraction or add records")
        problems.append(f"{out_dir / (name + '.parquet')}: the {name} split would be empty: {why}")
    if HELDOUT in rows and not rows[HELDOUT]:
        problems.append(f"{out_dir / 'heldout.parquet'}: data.heldout_sources left no row "
                        f"({len(splits[HELDOUT])} kept after deduplication against data.sources; "
                        "each must fit data.max_seq_length)")
    if problems:
        raise DataError(problems)


# ---------------------------------------------------------------- 6. template, tokenise

def load_tokenizer(params: Params):
    """The base's tokenizer (medqlora.core.modeling.load_tokenizer: pad falls back to eos)."""
    from medqlora.core.modeling import load_tokenizer as load
    tokenizer = load(params.model)
    if tokenizer.eos_token_id is None:
        raise DataError([f"model.base: the tokenizer of {params.model.base} has no eos token; "
                         "answers need one to end"])
    return tokenizer


def encode(tokenizer, prompts: list[str], answers: list[str]) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, answer_ids) per example: prompt with bos when the tokenizer adds one
    itself (so train matches `tokenizer(prompt)` at inference), answer + the end-of-turn
    token (templates.end_of_turn_id: the chat template's, else eos)."""
    bos, end = tokenizer.bos_token_id, end_of_turn_id(tokenizer)
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    out = []
    for p, a in zip(prompt_ids, answer_ids):
        if adds_bos and p[:1] != [bos]:
            p = [bos] + p
        out.append((list(p), list(a) + [end]))
    return out


def fit(prompt_ids: list[int], answer_ids: list[int], max_len: int,
        overlength: str) -> tuple[list[int], list[int]] | str:
    """(input_ids, labels) of one example within max_len, or "dropped".

    truncate keeps the whole prompt and the first max_len - len(prompt) answer tokens
    (e.g. 256 - 200 = 56); with none left the example is dropped.
    """
    total = len(prompt_ids) + len(answer_ids)
    if total > max_len:
        room = max_len - len(prompt_ids)
        if overlength == "drop" or room <= 0:
            return "dropped"
        answer_ids = answer_ids[:room]
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids


def build_rows(examples: list[Example], split: str, tokenizer, data: DataParams,
               counts: Counter) -> list[dict[str, Any]]:
    """Contract rows for one split; counts `truncated` and `dropped_overlength`."""
    if not examples:
        return []
    prompts = [format_messages(tokenizer, e.messages[:-1] + [{"role": "user",
                                                              "content": user_text(e)}],
                               data.system_prompt) for e in examples]
    answers = [reference_text(e) for e in examples]
    rows = []
    for e, prompt, answer, (p_ids, a_ids) in zip(examples, prompts, answers,
                                                  encode(tokenizer, prompts, answers)):
        fitted = fit(p_ids, a_ids, data.max_seq_length, data.overlength)
        if fitted == "dropped":
            counts["dropped_overlength"] += 1
            continue
        input_ids, labels = fitted
        counts["truncated"] += len(input_ids) < len(p_ids) + len(a_ids)
        rows.append({"id": content_id(e), "source": e.source, "kind": e.kind, "lang": e.lang,
                     "prompt": prompt, "reference": answer, "label": e.label,
                     "options": json.dumps(e.options, ensure_ascii=False) if e.options else None,
                     "input_ids": input_ids, "labels": labels, "length": len(input_ids),
                     "record_id": e.record_id, "split": split})
    return rows


# ---------------------------------------------------------------- 7. pack, write

def pack(rows: list[dict[str, Any]], max_len: int) -> list[dict[str, Any]]:
    """Pack train examples into rows of at most max_len tokens (best-fit decreasing).

    Longest first, each into the fullest row it still fits (ties: the earlier row), so an
    example is never split across rows. position_ids restart at 0 at each example and
    seq_lens lists the example lengths, so attention can be kept within each example
    (flash-attention varlen / position-id aware collators); labels keep their -100 prompt
    masks, and since every example starts with prompt tokens no loss crosses a boundary.
    Rows are not padded: the collator pads. Deterministic: ties broken by id.
    """
    order = sorted(rows, key=lambda r: (-r["length"], r["id"]))
    bins: list[list[dict]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for row in order:
        i = bisect.bisect_left(free, (row["length"], -1))
        if i == len(free):
            bins.append([row])
            bisect.insort(free, (max_len - row["length"], len(bins) - 1))
            continue
        room, index = free.pop(i)
        bins[index].append(row)
        bisect.insort(free, (room - row["length"], index))
    return [{"input_ids": [t for r in b for t in r["input_ids"]],
             "labels": [t for r in b for t in r["labels"]],
             "position_ids": [p for r in b for p in range(r["length"])],
             "seq_lens": [r["length"] for r in b],
             "ids": [r["id"] for r in b]} for b in bins]


def write_parquet(path: Path, rows: list[dict[str, Any]], packed: bool = False) -> None:
    """One Parquet file with the contract's column types (token lists as int32)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    ints = pa.list_(pa.int32())
    if packed:
        schema = pa.schema([("input_ids", ints), ("labels", ints), ("position_ids", ints),
                            ("seq_lens", ints), ("ids", pa.list_(pa.string()))])
    else:
        schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("kind", pa.string()),
                            ("lang", pa.string()), ("prompt", pa.string()),
                            ("reference", pa.string()), ("label", pa.string()),
                            ("options", pa.string()), ("input_ids", ints), ("labels", ints),
                            ("length", pa.int32()), ("record_id", pa.string())])
    columns = {name: [row[name] for row in rows] for name in schema.names}
    pq.write_table(pa.table(columns, schema=schema), path)


def percentiles(lengths: list[int]) -> dict[str, float]:
    """Token-length p50/p90/p99/max over every kept example (linear interpolation)."""
    import numpy as np
    if not lengths:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    values = np.percentile(np.asarray(lengths), [50, 90, 99])
    return {"p50": round(float(values[0]), 1), "p90": round(float(values[1]), 1),
            "p99": round(float(values[2]), 1), "max": int(max(lengths))}


def prepare(params: Params, out_dir: str | Path, metrics_path: str | Path,
            root: str | Path = ".") -> dict[str, Any]:
    """Run steps 1-7; returns the metrics. Raises DataError having written nothing."""
    data = params.data
    examples, rejects, records_in = collect(data, root)
    heldout: list[Example] = []
    if data.heldout_sources:
        heldout, more_rejects, more_in = collect(data, root, data.heldout_sources)
        rejects, records_in = rejects + more_rejects, records_in + more_in
    held = {id(e) for e in heldout}
    examples += heldout   # after the sources: a held-out record equal to one of them is dropped
    raw_keys = [_raw_key(e) for e in examples]
    for example in examples:
        _map_texts(example, normalise)
    phi_counts = apply_phi(examples, data.phi, data.max_errors_reported)
    examples, dupes = dedupe(examples, raw_keys)
    splits, leakage = assign_splits([e for e in examples if id(e) not in held],
                                    data.val_fraction, data.test_fraction)
    if data.heldout_sources:
        splits[HELDOUT] = [e for e in examples if id(e) in held]
    contamination = contamination_report(splits, data)
    tokenizer = load_tokenizer(params)
    counts: Counter = Counter(truncated=0, dropped_overlength=0)
    rows = {name: build_rows(splits[name], name, tokenizer, data, counts) for name in splits}
    check_splits(splits, rows, data, Path(out_dir))
    metrics = {
        "records_in": records_in, "rejected": len(rejects),
        "rejected_by_reason": dict(sorted(Counter(r.reason for r in rejects).items())),
        "duplicates": dupes["exact"] + dupes["normalised"], "duplicates_exact": dupes["exact"],
        "duplicates_normalised": dupes["normalised"],
        "truncated": counts["truncated"], "dropped_overlength": counts["dropped_overlength"],
        "splits": {name: len(rows[name]) for name in rows}, "leakage": leakage, "phi": phi_counts,
        "contamination": contamination,
        "length": percentiles([r["length"] for name in rows for r in rows[name]]),
        "kinds": dict(sorted(Counter(r["kind"] for n in rows for r in rows[n]).items())),
    }
    _write(params, out_dir, rows, rejects, metrics, tokenizer, root)
    write_json(metrics_path, metrics)
    log.info("prepare: %d records in, %d rejected, %d duplicates, %d truncated, %d dropped; "
             "train/val/test%s %s", records_in, len(rejects), metrics["duplicates"],
             counts["truncated"], counts["dropped_overlength"],
             "/heldout" if HELDOUT in rows else "", "/".join(map(str, metrics["splits"].values())))
    return metrics


def _write(params: Params, out_dir: str | Path, rows: dict[str, list], rejects: list[Reject],
           metrics: dict, tokenizer, root: str | Path) -> None:
    """Everything under out_dir, built in a temporary sibling and renamed at the end."""
    data = params.data
    with atomic_dir(out_dir) as tmp:
        for name in rows:
            write_parquet(tmp / f"{name}.parquet", rows[name])
        if data.packing:
            packed = pack(rows["train"], data.max_seq_length)
            write_parquet(tmp / "train_packed.parquet", packed, packed=True)
            metrics["packed_rows"] = len(packed)
        if data.on_invalid == "skip":
            with atomic_file(tmp / "rejects.jsonl") as handle:
                for r in rejects:
                    handle.write(json.dumps({"source": r.source, "reason": r.reason,
                                             "message": r.message}, ensure_ascii=False) + "\n")
        write_meta(tmp, stage="prepare",
                   params={"data": params.raw["data"],
                           "model": {k: params.raw["model"][k] for k in
                                     ("base", "gguf_file", "revision", "trust_remote_code")}},
                   inputs={s.path: Path(root) / s.path
                           for s in (*data.sources, *data.heldout_sources)},
                   extra={"counts": metrics, "template": template_name(tokenizer),
                          "tokenizer": {"name": params.model.base,
                                        "revision": params.model.revision,
                                        "vocab_size": len(tokenizer),
                                        "bos_token_id": tokenizer.bos_token_id,
                                        "eos_token_id": tokenizer.eos_token_id,
                                        "end_of_turn_id": end_of_turn_id(tokenizer),
                                        "pad_token_id": tokenizer.pad_token_id},
                          "max_seq_length": data.max_seq_length, "packing": data.packing})


def run(params: Params, out_dir: str | Path, metrics_path: str | Path) -> int:
    """The stage's library call: prepare, or print every problem and return 1."""
    try:
        prepare(params, out_dir, metrics_path)
    except DataError as err:
        for problem in err.problems:
            print(problem, file=sys.stderr)
        print(f"prepare: nothing was written ({out_dir} and {metrics_path} left as they were)",
              file=sys.stderr)
        return 1
    return 0
