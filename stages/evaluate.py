"""Evaluate stage: base vs base + adapter on the test split (perplexity, BLEU, ROUGE-L, accuracy).

    python stages/evaluate.py --params params.yaml --data data/prepared --adapter models/adapter \
        --predictions predictions --metrics metrics/evaluate.json

Reads `seed` and `evaluate`; the base and its quantization come from the adapter's meta.json.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medqlora.core import stage


def main(argv=None) -> int:
    parser = stage.parser(__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/prepared", help="prepared data (test.parquet)")
    parser.add_argument("--adapter", default="models/adapter", help="adapter folder from train")
    parser.add_argument("--predictions", default="predictions", help="output folder")
    parser.add_argument("--metrics", default="metrics/evaluate.json", help="metrics file")
    args, params = stage.start("evaluate", parser, argv)
    from medqlora.evaluate.evaluation import evaluate  # lazy: torch only after params are valid
    evaluate(params, args.data, args.adapter, args.predictions, args.metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
