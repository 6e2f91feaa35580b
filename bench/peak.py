"""Run a stage entrypoint and record its process's peak GPU memory at exit (bench only).

    MEDQLORA_PEAK_FILE=peak.json python bench/peak.py stages/train.py --params params.yaml ...

The stage runs as `python stages/<name>.py ...` would (runpy, `__main__`); when it exits, for
any reason, torch.cuda.max_memory_allocated / max_memory_reserved (GiB) are written to the
file named by MEDQLORA_PEAK_FILE (nothing on a CPU).
"""
import atexit
import json
import os
import runpy
import sys


def record() -> None:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    gib = 2**30
    with open(os.environ["MEDQLORA_PEAK_FILE"], "w", encoding="utf-8") as handle:
        json.dump({"allocated_gib": round(torch.cuda.max_memory_allocated() / gib, 2),
                   "reserved_gib": round(torch.cuda.max_memory_reserved() / gib, 2)}, handle)


if __name__ == "__main__":
    atexit.register(record)
    script, sys.argv = sys.argv[1], sys.argv[1:]
    # As `python stages/x.py` run from the project root with medqlora installed: the script's
    # folder first, then the project root (dvc.yaml runs every stage from there).
    sys.path[:0] = [os.path.dirname(os.path.abspath(script)), os.getcwd()]
    runpy.run_path(script, run_name="__main__")
