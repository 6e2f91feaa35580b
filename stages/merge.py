"""Merge stage: adapter merged into the weights it was trained against, parity proven
(see medqlora/ship/merging.py).

    python stages/merge.py --params params.yaml --data data/prepared --adapter models/adapter \
        --out models/merged --metrics metrics/merge.json

Exit 1 (after writing metrics/merge.json) when the merged model's logits drift beyond
merge.max_abs_logit_diff or its top-1 agreement falls under merge.min_top1_agreement.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medqlora.core import stage


def main(argv=None):
    parser = stage.parser("Merge the adapter and prove parity with base + adapter.")
    parser.add_argument("--data", default="data/prepared", help="prepared data (test prompts)")
    parser.add_argument("--adapter", default="models/adapter", help="adapter folder (train)")
    parser.add_argument("--out", default="models/merged", help="merged model folder")
    parser.add_argument("--metrics", default="metrics/merge.json", help="parity metrics file")
    args, params = stage.start("merge", parser, argv)
    from medqlora.ship.merging import run_merge
    return run_merge(params, args.data, args.adapter, args.out, args.metrics)


if __name__ == "__main__":
    sys.exit(main())
