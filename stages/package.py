"""Package stage: a checksummed, self-describing deployable bundle with a model card
(see medqlora/ship/packaging.py, medqlora/ship/manifest.py and medqlora/ship/modelcard.py).

    python stages/package.py --params params.yaml --adapter models/adapter --merged models/merged \
        --metrics-dir metrics --plots dvclive/train --out artifacts/package

Check a package anywhere with `medqlora verify artifacts/package`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medqlora.core import stage


def main(argv=None):
    parser = stage.parser("Build the deployable package: adapter, merged weights, card, manifest.")
    parser.add_argument("--adapter", default="models/adapter", help="adapter folder (train)")
    parser.add_argument("--merged", default="models/merged", help="merged folder (merge)")
    parser.add_argument("--metrics-dir", default="metrics", help="folder of stage metrics")
    parser.add_argument("--plots", default="dvclive/train", help="dvclive folder of train")
    parser.add_argument("--out", default="artifacts/package", help="package folder")
    args, params = stage.start("package", parser, argv)
    from medqlora.ship.packaging import build_package
    build_package(params, args.adapter, args.merged, args.metrics_dir, args.plots, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
