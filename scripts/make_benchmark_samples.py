"""Write small synthetic benchmark files in each public layout (for tests and timing runs).

    python scripts/make_benchmark_samples.py data/benchmarks/samples            # 8 items each
    python scripts/make_benchmark_samples.py /tmp/medqa --medqa-items 1273      # timing size

The questions are made up (seeded templates), never copied from a benchmark: they exercise
the readers, the harness tasks and the timing, not medicine. Layouts, as published:

    medqa/test.jsonl, medqa/train.jsonl     MedQA-USMLE 4 options: {"question", "answer",
                                            "options": {"A".."D"}, "meta_info", "answer_idx"}
    medmcqa/dev.json, medmcqa/train.json    MedMCQA JSON lines: {"id", "question", "opa".."opd",
                                            "cop": 1-4, "choice_type", "exp", "subject_name",
                                            "topic_name"}
    pubmedqa/test_set.json, .../train_set.json  PubMedQA labeled: {PMID: {"QUESTION",
                                            "CONTEXTS", "LABELS", "MESHES", "YEAR",
                                            "reasoning_required_pred", "reasoning_free_pred",
                                            "final_decision", "LONG_ANSWER"}}
    mmlu/test/<subject>_test.csv, mmlu/dev/<subject>_dev.csv   MMLU: no header,
                                            question,A,B,C,D,answer

A MedQA test question here is ~120 words with options, about the public set's mean length, so
`--medqa-items 1273` times the benchmark step at the public test size.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

LETTERS = "ABCD"
MMLU_SUBJECTS = ("anatomy", "clinical_knowledge", "college_medicine", "medical_genetics",
                 "professional_medicine", "college_biology")
DRUGS = ["amoxicillin", "metformin", "lisinopril", "furosemide", "heparin", "prednisone",
         "levothyroxine", "omeprazole", "atorvastatin", "ceftriaxone", "insulin", "aspirin"]
TESTS = ["electrocardiogram", "chest radiograph", "serum lipase", "urinalysis", "CT scan of the "
         "head", "blood cultures", "thyroid-stimulating hormone", "echocardiogram"]
FINDINGS = ["fever", "productive cough", "epigastric pain", "fatigue", "weight loss", "dyspnea",
            "palpitations", "polyuria", "headache", "joint swelling", "pallor", "jaundice"]
HISTORY = ["type 2 diabetes mellitus", "hypertension", "asthma", "chronic kidney disease",
           "hypothyroidism", "no significant past history", "atrial fibrillation"]


def vignette(rng: random.Random) -> str:
    """A made-up clinical vignette of about 110 words, USMLE-style."""
    age, sex = rng.randint(18, 85), rng.choice(["man", "woman"])
    a, b, c = rng.sample(FINDINGS, 3)
    parts = [
        f"A {age}-year-old {sex} comes to the emergency department because of {a} and {b} "
        f"for the past {rng.randint(2, 14)} days.",
        f"The patient has a history of {rng.choice(HISTORY)} and takes {rng.choice(DRUGS)} "
        "daily. The patient does not smoke and drinks alcohol occasionally.",
        f"Temperature is {rng.uniform(36.5, 39.5):.1f}°C, pulse {rng.randint(60, 120)}/min, "
        f"respirations {rng.randint(12, 26)}/min, and blood pressure "
        f"{rng.randint(95, 165)}/{rng.randint(55, 100)} mm Hg.",
        f"Physical examination shows {c} and mild tenderness on palpation; the remainder of "
        "the examination shows no abnormalities.",
        f"Laboratory studies show hemoglobin {rng.uniform(9, 16):.1f} g/dL, leukocyte count "
        f"{rng.randint(4, 19)},000/mm3, and serum creatinine {rng.uniform(0.6, 2.4):.1f} mg/dL.",
        "Which of the following is the most appropriate next step in management?",
    ]
    return " ".join(parts)


def short_question(rng: random.Random, subject: str) -> str:
    return (f"In {subject.replace('_', ' ')}, which of the following best explains "
            f"{rng.choice(FINDINGS)} in a patient taking {rng.choice(DRUGS)}?")


def options(rng: random.Random) -> list[str]:
    return [f"Order a {t}" for t in rng.sample(TESTS, 4)]


def medqa(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        opts, answer = options(rng), rng.randrange(4)
        rows.append({"question": vignette(rng), "answer": opts[answer],
                     "options": dict(zip(LETTERS, opts)), "meta_info": "step2&3",
                     "answer_idx": LETTERS[answer]})
    return rows


def medmcqa(rng: random.Random, n: int, start: int) -> list[dict]:
    rows = []
    for i in range(n):
        opts = rng.sample(DRUGS, 4)
        rows.append({"id": f"sample-{start + i:05d}", "question": short_question(rng, "pharmacology"),
                     "opa": opts[0], "opb": opts[1], "opc": opts[2], "opd": opts[3],
                     "cop": rng.randint(1, 4), "choice_type": "single", "exp": "",
                     "subject_name": "Pharmacology", "topic_name": None})
    return rows


def pubmedqa(rng: random.Random, n: int, start: int) -> dict[str, dict]:
    out = {}
    for i in range(n):
        drug, finding = rng.choice(DRUGS), rng.choice(FINDINGS)
        out[str(start + i)] = {
            "QUESTION": f"Does {drug} reduce {finding} in adults?",
            "CONTEXTS": [f"We studied {rng.randint(40, 900)} adults given {drug} or placebo.",
                         f"{finding.capitalize()} was recorded at {rng.randint(4, 52)} weeks."],
            "LABELS": ["METHODS", "RESULTS"], "MESHES": ["Adult", "Humans"],
            "YEAR": str(rng.randint(1995, 2018)), "reasoning_required_pred": "yes",
            "reasoning_free_pred": "yes", "final_decision": rng.choice(["yes", "no", "maybe"]),
            "LONG_ANSWER": f"{drug.capitalize()} changed {finding} little.",
        }
    return out


def mmlu(rng: random.Random, subject: str, n: int) -> list[list[str]]:
    return [[short_question(rng, subject), *rng.sample(DRUGS, 4), rng.choice(LETTERS)]
            for _ in range(n)]


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")


def _csv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows(rows)


def write_samples(out: str | Path, n_test: int = 8, n_fewshot: int = 5, seed: int = 0,
                  medqa_items: int | None = None) -> dict[str, dict[str, Path]]:
    """Write every layout under `out`; returns {task: {"path": scored file, "fewshot_path"}}."""
    out, rng = Path(out), random.Random(seed)
    files: dict[str, dict[str, Path]] = {}
    files["medqa_4options"] = {"path": out / "medqa/test.jsonl",
                               "fewshot_path": out / "medqa/train.jsonl"}
    _jsonl(files["medqa_4options"]["path"], medqa(rng, medqa_items or n_test))
    _jsonl(files["medqa_4options"]["fewshot_path"], medqa(rng, n_fewshot))
    files["medmcqa"] = {"path": out / "medmcqa/dev.json", "fewshot_path": out / "medmcqa/train.json"}
    _jsonl(files["medmcqa"]["path"], medmcqa(rng, n_test, 0))
    _jsonl(files["medmcqa"]["fewshot_path"], medmcqa(rng, n_fewshot, n_test))
    files["pubmedqa"] = {"path": out / "pubmedqa/test_set.json",
                         "fewshot_path": out / "pubmedqa/pqal_fold0/train_set.json"}
    for key, count, start in (("path", n_test, 10000000), ("fewshot_path", n_fewshot, 20000000)):
        files["pubmedqa"][key].parent.mkdir(parents=True, exist_ok=True)
        files["pubmedqa"][key].write_text(json.dumps(pubmedqa(rng, count, start), indent=1),
                                          encoding="utf-8")
    for subject in MMLU_SUBJECTS:
        task = f"mmlu_{subject}"
        files[task] = {"path": out / f"mmlu/test/{subject}_test.csv",
                       "fewshot_path": out / f"mmlu/dev/{subject}_dev.csv"}
        _csv(files[task]["path"], mmlu(rng, subject, n_test))
        _csv(files[task]["fewshot_path"], mmlu(rng, subject, n_fewshot))
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write (e.g. data/benchmarks/samples)")
    parser.add_argument("--items", type=int, default=8, help="scored items per task")
    parser.add_argument("--fewshot-items", type=int, default=5, help="few-shot pool per task")
    parser.add_argument("--medqa-items", type=int, default=None,
                        help="MedQA test items (1273 = the public test size)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    files = write_samples(args.out, args.items, args.fewshot_items, args.seed, args.medqa_items)
    for task, paths in files.items():
        print(f"{task:28s} {paths['path']}  (few-shot: {paths['fewshot_path']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
