"""Benchmark stage: standard medical benchmarks through lm-evaluation-harness, base vs adapter.

    python stages/benchmark.py --params params.yaml --adapter models/adapter \
        --data data/benchmarks --out benchmarks --metrics metrics/benchmark.json

Reads `evaluate.benchmarks` (tasks, files, shots, limits), `evaluate.benchmark_batch_size` and
`evaluate.compare_base`; the base and its quantization come from the adapter's meta.json.
Every benchmark file is checked (file:line errors) before any model loads; with no benchmarks
listed the stage writes an empty result in a second.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medqlora.core import stage


def main(argv=None) -> int:
    parser = stage.parser(__doc__.splitlines()[0])
    parser.add_argument("--adapter", default="models/adapter", help="adapter folder from train")
    parser.add_argument("--data", default="data/benchmarks",
                        help="folder holding the benchmark files (the stage's DVC dependency)")
    parser.add_argument("--out", default="benchmarks", help="task folder and meta.json")
    parser.add_argument("--metrics", default="metrics/benchmark.json", help="metrics file")
    args, params = stage.start("benchmark", parser, argv)
    from medqlora.evaluate.benchmarks import BenchmarkError, benchmark
    try:
        benchmark(params, args.adapter, args.data, args.out, args.metrics)
    except BenchmarkError as err:
        for problem in err.problems:
            print(problem, file=sys.stderr)
        print(f"benchmark: nothing was run ({err.count} problem(s) in the benchmark files; "
              "no model was loaded)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
