"""What every stage entrypoint does first: parse its paths, validate params, pick the runner.

    args, params = stage.start("train", parser, argv)

validates the *whole* params file (every problem at once, exit 2) before any model or data is
loaded, and with `runner.backend: docker` re-executes the same command inside the project
image (see medqlora.runner) and exits with the container's code.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from medqlora.config import Params, ParamsError, load_params, warnings_for

EXIT_INVALID_PARAMS = 2
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


def start(name: str, arg_parser: argparse.ArgumentParser,
          argv: list[str] | None = None) -> tuple[argparse.Namespace, Params]:
    """Parse args and validate params; hand over to the container runner when configured."""
    setup_logging()
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
        from medqlora.runner import run_in_container  # lazy: the docker SDK only when used
        raise SystemExit(run_in_container(params.runner, name, sys.argv if argv is None
                                          else [sys.argv[0], *argv]))
    log.info("%s: params valid (%s)", name, args.params)
    return args, params
