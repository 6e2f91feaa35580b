"""Prepare stage: raw records -> data/prepared/{train,val,test}.parquet + metrics.

    python stages/prepare.py --params params.yaml --out data/prepared --metrics metrics/prepare.json

Reads `data` and the tokenizer of `model.base`; see medqlora/data/dataset.py for the steps.
Exit 0 on success, 1 when records are invalid or hold personal identifiers (nothing written),
2 when params.yaml is invalid.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medqlora.core import stage


def main(argv: list[str] | None = None) -> int:
    parser = stage.parser(__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/prepared", help="output folder")
    parser.add_argument("--metrics", default="metrics/prepare.json", help="metrics file")
    args, params = stage.start("prepare", parser, argv)
    from medqlora.data.dataset import run  # lazy: libraries only after the interpreter check
    return run(params, args.out, args.metrics)


if __name__ == "__main__":
    sys.exit(main())
