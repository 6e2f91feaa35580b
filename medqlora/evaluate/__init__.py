"""The evaluate and benchmark phases: decoding (generation), scoring (metrics), the evaluate
stage (evaluation) and lm-evaluation-harness benchmarks."""
