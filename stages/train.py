"""Train stage: QLoRA adapter from the prepared data (see medqlora/train/training.py).

    python stages/train.py --params params.yaml --data data/prepared --out models/adapter \
        --checkpoints checkpoints/train --live dvclive/train --metrics metrics/train.json \
        --measured metrics/measured/train.json
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medqlora.core import stage


def main(argv=None):
    parser = stage.parser("Train a LoRA adapter on the 4-bit base.")
    parser.add_argument("--data", default="data/prepared", help="prepared data folder")
    parser.add_argument("--out", default="models/adapter", help="adapter output folder")
    parser.add_argument("--checkpoints", default="checkpoints/train",
                        help="resumable checkpoints (git-ignored, not a DVC output)")
    parser.add_argument("--live", default="dvclive/train",
                        help="dvclive folder (loss curves); none: no curves (outside DVC)")
    parser.add_argument("--metrics", default="metrics/train.json", help="metrics file")
    parser.add_argument("--measured", default=None,
                        help="speed, memory and resume of this run (git-ignored, not a DVC "
                             "output: they differ per machine); default: measured/<name> "
                             "beside --metrics (metrics/measured/train.json)")
    args, params = stage.start("train", parser, argv)
    # --- distributed (medqlora/train/launch.py): num_processes > 1 re-runs this command under
    # accelerate launch, here (inside the container when runner.backend is docker) ---
    from medqlora.train import launch
    if launch.needed(params.runner.distributed):
        script_args = sys.argv[1:] if argv is None else list(argv)
        raise SystemExit(launch.relaunch(params, str(Path(__file__).resolve()), script_args))
    launch.one_gpu_unless_launched()  # else the Trainer spreads one process over every GPU
    # --- end distributed ---
    from medqlora.train.preflight import EXIT_WONT_FIT, WontFit
    from medqlora.train.training import Diverged, run
    live = None if args.live == "none" else args.live
    try:
        run(params, args.data, args.out, args.checkpoints, live, args.metrics, args.measured)
    except Diverged as err:  # the divergence guard: exit 1, nothing published
        print(err, file=sys.stderr)
        raise SystemExit(1) from None
    except WontFit as err:  # the preflight: exit 3 before loading anything
        print(err, file=sys.stderr)
        raise SystemExit(EXIT_WONT_FIT) from None


if __name__ == "__main__":
    main()
