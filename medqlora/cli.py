"""The `medqlora` command: validate params; verify, run, serve and export packages.

    medqlora validate [PATH]      exit 0 when valid, 2 with one `key.path: problem` per line
                                  (the evaluate.benchmarks files read and checked too)
    medqlora verify DIR           exit 0 when a package matches its manifest, 1 naming each
                                  missing, extra or altered file
    medqlora generate --package DIR (--prompt TEXT | --file JSONL) [--merged] [--stats]
    medqlora preflight [PATH]     estimated peak GPU memory of the train run; exit 3 when it
                                  exceeds train.memory_budget_gib or the visible GPU
    medqlora serve DIR | --repo URL --rev REV --artifact NAME [--port 8000] [--merged]
                   [--api-key KEY] [--public-metrics] [--max-body-bytes N]
                                  OpenAI-compatible HTTP server with Prometheus /metrics
    medqlora export DIR --out DIR [--targets vllm,gguf,ollama]
                                  vLLM-ready adapter, GGUF files (llama.cpp's converters),
                                  Ollama Modelfiles
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from medqlora.core.config import (ParamsError, build_params, load_params, read_yaml,
                                  validate_document, warnings_for)
from medqlora.ship.serve.guards import API_KEY_ENV, DEFAULT_MAX_BODY_BYTES

EXIT_INVALID = 2


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate a params file: every problem at once, each with its key path; the benchmark
    files it lists are read and checked as the benchmark stage's first step checks them."""
    from medqlora.evaluate.benchmarks import file_problems
    try:
        doc = read_yaml(args.path)
    except ParamsError as err:
        return _invalid(args.path, err.problems, len(err.problems))
    problems = validate_document(doc, Path.cwd())
    evaluate = doc.get("evaluate") if isinstance(doc, dict) else None
    files = file_problems(evaluate.get("benchmarks") if isinstance(evaluate, dict) else None)
    if files is not None:  # a file's listing is capped: count its problems, not its lines
        return _invalid(args.path, problems + files.problems, len(problems) + files.count)
    if problems:
        return _invalid(args.path, problems, len(problems))
    for note in warnings_for(build_params(doc)):
        print(f"warning: {note}", file=sys.stderr)
    print(f"{args.path}: valid")
    return 0


def _invalid(path: str, problems: list[str], count: int) -> int:
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{path}: {count} problem(s)", file=sys.stderr)
    return EXIT_INVALID


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every file of a package against its manifest; name each problem."""
    from medqlora.ship.manifest import verify
    problems = verify(args.dir)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{args.dir}: FAILED verification ({len(problems)} problem(s))", file=sys.stderr)
        return 1
    print(f"{args.dir}: verified")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Answer prompts with a verified package (4-bit base + adapter, or the merged weights)."""
    from medqlora.core.modeling import WeightsFileError
    from medqlora.evaluate.generation import generate, read_prompts
    if _refuse_unverified(args.package):
        return 1
    try:
        texts = read_prompts(args.prompt, args.file)
    except (OSError, ValueError) as err:
        print(err, file=sys.stderr)
        return EXIT_INVALID
    try:
        result = generate(args.package, texts, merged=args.merged)
    except WeightsFileError as err:  # a truncated file whose manifest entry was rewritten
        print(err, file=sys.stderr)
        return 1
    for answer in result["answers"]:
        print(answer)
    if args.stats:
        print(f"{result['new_tokens']} new tokens in {result['seconds']:.2f} s: "
              f"{result['tokens_per_second']:.1f} tokens/s on {result['device']}; peak memory "
              f"{result['peak_memory_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
    return 0


def _refuse_unverified(package) -> bool:
    """Print every problem of a package that fails `medqlora verify`; True when it does."""
    from medqlora.ship.manifest import verify
    problems = verify(package)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{package}: fails `medqlora verify`; refusing to load it", file=sys.stderr)
    return bool(problems)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a verified package (a folder, or pulled at a git revision) over the OpenAI API."""
    from medqlora.ship.serve import api as serve_api
    from medqlora.ship.serve.guards import Guards
    logging.basicConfig(level=os.environ.get("MEDQLORA_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    problem = _serve_setting_problem(args)
    if problem:
        print(f"serve: {problem}", file=sys.stderr)
        return EXIT_INVALID
    guards = Guards(args.max_body_bytes, args.api_key, args.public_metrics)
    package = args.package
    if args.repo:
        if package or not (args.rev and args.artifact):
            print("serve: give a package folder, or --repo with --rev and --artifact",
                  file=sys.stderr)
            return EXIT_INVALID
        try:
            package = serve_api.pull_package(args.repo, args.rev, args.artifact, args.dest)
        except (OSError, RuntimeError) as err:
            print(err, file=sys.stderr)
            return 1
    elif not package:
        print("serve: give a package folder (e.g. artifacts/package), or --repo/--rev/--artifact",
              file=sys.stderr)
        return EXIT_INVALID
    if _refuse_unverified(package):
        return 1
    from medqlora.core.modeling import WeightsFileError
    try:
        serve_api.serve(package, host=args.host, port=args.port, merged=args.merged,
                        name=args.served_model_name, max_batch_size=args.max_batch_size,
                        batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
                        max_context=args.max_context, guards=guards)
    except WeightsFileError as err:  # raised while loading, before the server starts
        print(err, file=sys.stderr)
        return 1
    return 0


def _serve_setting_problem(args: argparse.Namespace) -> str | None:
    """The first serve flag that cannot work, named, or None."""
    if args.max_body_bytes < 1:
        return f"--max-body-bytes: {args.max_body_bytes}; give a positive number of bytes"
    if args.api_key is not None and not args.api_key.strip():
        # An empty key from an unset secret must not start a server that looks protected.
        return f"--api-key / {API_KEY_ENV} is empty; set a key, or unset the variable"
    if args.public_metrics and not args.api_key:
        return "--public-metrics only makes sense with an API key (--api-key or " \
               f"{API_KEY_ENV}); without one /metrics is already open"
    return None


def cmd_export(args: argparse.Namespace) -> int:
    """Export a verified package for vLLM, llama.cpp (GGUF) and Ollama."""
    from medqlora.core.modeling import WeightsFileError
    from medqlora.ship import export
    logging.basicConfig(level=os.environ.get("MEDQLORA_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    unknown = sorted(set(targets) - set(export.TARGETS))
    if unknown or not targets:
        print(f"--targets: {', '.join(unknown) or 'empty'}: choose from "
              f"{', '.join(export.TARGETS)}", file=sys.stderr)
        return EXIT_INVALID
    if _refuse_unverified(args.package):
        return 1
    try:
        record = export.export(args.package, args.out, targets, args.gguf_type,
                               args.max_lora_rank, args.llama_cpp)
    except export.ExportError as err:
        for problem in err.problems:
            print(problem, file=sys.stderr)
        print(f"{args.package}: export failed; {args.out} was not written", file=sys.stderr)
        return 1
    except WeightsFileError as err:  # checked before anything is read or written
        print(err, file=sys.stderr)
        return 1
    for rel in sorted(record["files"]):
        print(f"{args.out}/{rel}")
    if "vllm" in record["targets"]:
        print(f"\nvLLM (from {args.out}):\n{record['targets']['vllm']['command']}")
    return 0


def cmd_preflight(args: argparse.Namespace) -> int:
    """Estimate train's, evaluate's and merge's peak GPU memory; exit 3 when one won't fit."""
    from medqlora.train.preflight import EXIT_WONT_FIT, LaterStages, preflight
    try:
        params = load_params(args.path)
    except ParamsError as err:
        print("\n".join(err.problems), file=sys.stderr)
        return EXIT_INVALID
    ev, merge = params.evaluate, params.merge
    verdict = preflight(params, LaterStages(ev.batch_size, ev.max_examples, ev.max_new_tokens,
                                            merge.enabled, merge.dtype))
    print("\n".join(verdict.lines), file=sys.stdout if verdict.ok else sys.stderr)
    return 0 if verdict.ok else EXIT_WONT_FIT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medqlora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    validate = sub.add_parser("validate", help="check a params file against the schema")
    validate.add_argument("path", nargs="?", default="params.yaml")
    validate.set_defaults(func=cmd_validate)
    verify = sub.add_parser("verify", help="check a package's files against its manifest.json")
    verify.add_argument("dir", help="package folder (e.g. artifacts/package)")
    verify.set_defaults(func=cmd_verify)
    gen = sub.add_parser("generate", help="answer prompts with a verified package")
    gen.add_argument("--package", required=True, help="package folder (e.g. artifacts/package)")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one user question (templated like training)")
    source.add_argument("--file", help='JSONL file, one {"prompt": ...} per line')
    gen.add_argument("--merged", action="store_true", help="use merged/ instead of base + adapter")
    gen.add_argument("--stats", action="store_true", help="print tokens/s and peak memory")
    gen.set_defaults(func=cmd_generate)
    pre = sub.add_parser("preflight", help="estimate the train run's peak GPU memory")
    pre.add_argument("path", nargs="?", default="params.yaml")
    pre.set_defaults(func=cmd_preflight)
    srv = sub.add_parser("serve", help="serve a verified package over the OpenAI HTTP API")
    srv.add_argument("package", nargs="?", help="package folder (e.g. artifacts/package)")
    srv.add_argument("--repo", help="git/DVC repository to pull the package from (URL or path)")
    srv.add_argument("--rev", help="git revision (tag) of --repo, e.g. v1.0.0")
    srv.add_argument("--artifact", help="artifact name in --repo's dvc.yaml (medqlora-tiny-med)")
    srv.add_argument("--dest", default="artifacts/package",
                     help="where --repo's package is pulled (default artifacts/package)")
    srv.add_argument("--host", default="127.0.0.1",
                     help="bind address (0.0.0.0 in a container); a non-loopback one without "
                          "an API key logs a warning")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--merged", action="store_true", help="serve merged/ instead of base + adapter")
    srv.add_argument("--served-model-name", help="the `model` clients send (default: package.name)")
    srv.add_argument("--max-batch-size", type=int, default=16,
                     help="requests decoded together (continuous batching: a request joins "
                          "the running batch when a row is free)")
    srv.add_argument("--batch-wait-ms", type=float, default=10.0,
                     help="when nothing runs, how long the first request waits for others "
                          "to prefill with it")
    srv.add_argument("--max-context", type=int, default=2048,
                     help="positions of one request (prompt + max_tokens; the model's own "
                          "maximum when smaller): the KV cache holds this many for every row")
    srv.add_argument("--max-queue", type=int, default=256,
                     help="requests waiting beyond this get 503 server_overloaded; a completions "
                          "request with more prompts than this gets 400")
    srv.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                     help="larger request bodies get 413, before any is parsed "
                          f"(default {DEFAULT_MAX_BODY_BYTES}: 1 MiB)")
    srv.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                     help="require `Authorization: Bearer KEY` on every route but /health, "
                          "/metrics included (else 401 invalid_api_key); default: the "
                          f"{API_KEY_ENV} variable, the better place (a flag shows in `ps`)")
    srv.add_argument("--public-metrics", action="store_true",
                     help="with an API key, leave /metrics open (for a scraper without the key)")
    srv.set_defaults(func=cmd_serve)
    exp = sub.add_parser("export", help="export a verified package for vLLM, llama.cpp, Ollama")
    exp.add_argument("package", help="package folder (e.g. artifacts/package)")
    exp.add_argument("--out", required=True, help="export folder (e.g. artifacts/export)")
    exp.add_argument("--targets", default="vllm,gguf,ollama",
                     help="comma-separated: vllm, gguf, ollama (default: all)")
    exp.add_argument("--gguf-type", default="auto", choices=["auto", "f32", "f16", "bf16", "q8_0"],
                     help="GGUF tensor type (auto: the weights' own 16-bit type)")
    exp.add_argument("--max-lora-rank", type=int,
                     help="the vLLM --max-lora-rank the adapter must fit (default: the smallest "
                          "allowed value >= its rank)")
    exp.add_argument("--llama-cpp", help="llama.cpp source folder with the converters "
                     "(default: .cache/llama.cpp/src/vendor/llama.cpp from `make llama-cpp`)")
    exp.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
