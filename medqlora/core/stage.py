"""What every stage entrypoint does first: check the interpreter, parse its paths, validate
params, pick the runner, and hand the library only the params dvc.yaml declares for the stage.

    args, params = stage.start("train", parser, argv)

checks that this `python` has the project's libraries (DVC runs whichever `python` PATH holds:
without the venv activated that is the system's, and the stage would die deep inside with
"No module named 'torch'"), pins the CPU numerics before torch loads (the same bytes on any
x86-64 CPU with AVX2: medqlora.core.cpu_numerics), validates the *whole* params file (every
problem at once, exit 2) before any model or data is loaded, and with `runner.backend: docker`
re-executes the same command inside the project image (see medqlora.core.runner) and exits
with the container's code.
The params returned are `contract.restrict(params, name)`: reading a key that dvc.yaml does not
list under the stage's `params:` raises contract.UndeclaredParams. An output that a full disk,
quota or `ulimit -f` stopped (medqlora.core.outputs.OutputNotWritten) ends the stage with its
one-line message and exit 1, not a traceback. HF_DATASETS_CACHE is pointed inside the project
(datasets_cache_in_project), so no copy of the data lands in a home folder.

Only the standard library is imported at module level, so the interpreter check runs first.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys

EXIT_INVALID_PARAMS = 2
EXIT_WRONG_INTERPRETER = 4
# What every stage imports (pyproject.toml pins them; `make setup` installs them in .venv).
REQUIRED = ("yaml", "jsonschema", "torch", "transformers", "peft", "pyarrow")
IN_CONTAINER = "MEDQLORA_IN_CONTAINER"
log = logging.getLogger("medqlora")


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the `--params` option every stage takes."""
    out = argparse.ArgumentParser(description=description)
    out.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    return out


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("MEDQLORA_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def require_interpreter(name: str) -> None:
    """Exit 4 with one line when this interpreter lacks the project's libraries."""
    missing = [module for module in REQUIRED if importlib.util.find_spec(module) is None]
    if missing:
        print(f"{name}: {sys.executable} lacks {', '.join(missing)}: run the stages with the "
              "project's venv (`source .venv/bin/activate` first, or `make repro`)",
              file=sys.stderr)
        raise SystemExit(EXIT_WRONG_INTERPRETER)


def datasets_cache_in_project() -> str:
    """Point the `datasets` cache at $MEDQLORA_CACHE/datasets (default .cache/medqlora/datasets,
    git-ignored) before any library imports datasets, and return it.

    datasets' default, ~/.cache/huggingface/datasets, would keep a copy of every file it
    loads in a home folder: for medical data, a leak. The stages load their data in memory
    (train: Dataset over a parquet table; benchmark: task_data.py), so nothing should land
    there anyway; this keeps it so if a library caches on its own. Set even when the shell
    has HF_DATASETS_CACHE: that is often a shared folder."""
    root = os.environ.get("MEDQLORA_CACHE") or os.path.join(".cache", "medqlora")
    os.environ["HF_DATASETS_CACHE"] = os.path.abspath(os.path.join(root, "datasets"))
    return os.environ["HF_DATASETS_CACHE"]


def report_unwritten_outputs(name: str) -> None:
    """Print a full disk, quota or file-size limit (outputs.OutputNotWritten) as its one-line
    message, exit 1: the message names the output and the fix; a traceback would bury it."""
    default = sys.excepthook

    def hook(kind, value, traceback):
        outputs = sys.modules.get("medqlora.core.outputs")  # not imported: not raised
        if outputs is not None and issubclass(kind, outputs.OutputNotWritten):
            print(f"{name}: {value.strerror}", file=sys.stderr)
        else:
            default(kind, value, traceback)
    sys.excepthook = hook


def start(name: str, arg_parser: argparse.ArgumentParser, argv: list[str] | None = None):
    """Check the interpreter, parse args, validate params; hand over to the container runner
    when configured. Returns (args, the params dvc.yaml declares for stage `name`)."""
    require_interpreter(name)
    from medqlora.core import contract, cpu_numerics
    cpu_numerics.pin_environment()  # before anything imports torch: its kernels read these
    from medqlora.core.config import ParamsError, load_params, warnings_for
    setup_logging()
    datasets_cache_in_project()
    report_unwritten_outputs(name)
    args = arg_parser.parse_args(argv)
    try:
        params = load_params(args.params)
    except ParamsError as err:
        for problem in err.problems:
            print(problem, file=sys.stderr)
        print(f"{name}: {args.params} is invalid ({len(err.problems)} problem(s)); "
              "nothing was run", file=sys.stderr)
        raise SystemExit(EXIT_INVALID_PARAMS) from None
    for note in warnings_for(params):
        log.warning(note)
    if params.runner.backend == "docker" and not os.environ.get(IN_CONTAINER):
        from medqlora.core.runner import run_in_container  # lazy: the docker SDK only when used
        raise SystemExit(run_in_container(params.runner, name, sys.argv if argv is None
                                          else [sys.argv[0], *argv]))
    log.info("%s: params valid (%s)", name, args.params)
    return args, contract.restrict(params, name)
