"""The `medqlora` command: validate params, and (later issues) verify and run packages.

    medqlora validate [PATH]      exit 0 when valid, 2 with one `key.path: problem` per line
"""
from __future__ import annotations

import argparse
import sys

from medqlora.config import ParamsError, load_params, warnings_for

EXIT_INVALID = 2


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate a params file: every problem at once, each with its key path."""
    try:
        params = load_params(args.path)
    except ParamsError as err:
        for problem in err.problems:
            print(problem, file=sys.stderr)
        print(f"{args.path}: {len(err.problems)} problem(s)", file=sys.stderr)
        return EXIT_INVALID
    for note in warnings_for(params):
        print(f"warning: {note}", file=sys.stderr)
    print(f"{args.path}: valid")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medqlora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    validate = sub.add_parser("validate", help="check a params file against the schema")
    validate.add_argument("path", nargs="?", default="params.yaml")
    validate.set_defaults(func=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
