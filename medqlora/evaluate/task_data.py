"""The data of the generated lm-evaluation-harness tasks, held in memory.

medqlora.evaluate.benchmarks copies this file into the task folder (benchmarks/tasks/), whose
task files name `task_data.load` as their `custom_dataset` and list their JSONL files, relative
to that folder, under `dataset_kwargs.data_files`. lm_eval calls it instead of
`datasets.load_dataset`.

Why not the harness's `dataset_path: json`: datasets would copy every file into its cache
(~/.cache/huggingface/datasets by default), so a copy of the benchmark items would stay in a
home folder after each run (for medical data, a leak), and the paths would have to be
absolute. Here nothing is written anywhere, and the folder works wherever it lies.
"""
from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load(data_files: dict[str, str], **_metadata) -> datasets.DatasetDict:
    """{split: JSONL file relative to this folder} -> those splits, in memory. (lm_eval passes
    the task's metadata too, e.g. its version and the model's arguments: not needed here.)"""
    return datasets.DatasetDict({split: datasets.Dataset.from_list(_rows(HERE / name))
                                 for split, name in data_files.items()})


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
