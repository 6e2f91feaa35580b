"""bench/bench_serve.py's pure helpers: the nearest-rank percentile and a row's arithmetic
(TTFT, pooled inter-chunk gaps, rates). No server, no model."""
from __future__ import annotations

import pytest

from bench.bench_serve import percentile, summarise, table


def test_percentile_is_nearest_rank():
    values = [15, 20, 35, 40, 50]          # the textbook example, given out of order below
    shuffled = [40, 15, 50, 20, 35]
    # rank = ceil(q / 100 x 5): p5 -> 1, p30 -> 2, p40 -> 2, p50 -> 3, p90 -> 5, p100 -> 5
    assert [percentile(shuffled, q) for q in (0, 5, 30, 40, 50, 90, 100)] == \
        [15, 15, 20, 20, 35, 50, 50]
    assert shuffled == [40, 15, 50, 20, 35]  # the caller's list is not sorted in place
    hundred = list(range(1, 101))           # 1..100: the q-th percentile is q itself
    assert [percentile(hundred, q) for q in (50, 90, 99)] == [50, 90, 99]
    # 10 values: p99 -> rank ceil(9.9) = 10, the largest; p90 -> rank 9
    assert percentile([0.1 * i for i in range(1, 11)], 99) == pytest.approx(1.0)
    assert percentile([0.1 * i for i in range(1, 11)], 90) == pytest.approx(0.9)
    assert percentile([7.0], 99) == 7.0


def test_percentile_refuses_no_values_and_bad_q():
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\], got 101"):
        percentile([1, 2], 101)


def test_summarise_pools_the_gaps_of_every_answer():
    answers = [  # content chunks at these seconds after sending
        {"ttft": 0.1, "latency": 0.5, "chunks": [0.1, 0.2, 0.4], "tokens": 3},   # gaps .1 .2
        {"ttft": 0.3, "latency": 1.0, "chunks": [0.3, 0.35, 0.65, 0.95], "tokens": 5},  # .05 .3 .3
        {"ttft": 0.2, "latency": 0.2, "chunks": [0.2], "tokens": 1},              # no gap
    ]
    row = summarise(answers, clients=2, wall=2.0)
    assert row["requests"] == 3 and row["itl_gaps"] == 5
    assert row["requests_per_s"] == pytest.approx(1.5)          # 3 answers / 2 s
    assert row["gen_tokens_per_s"] == pytest.approx(4.5)        # (3 + 5 + 1) tokens / 2 s
    assert row["mean_tokens"] == pytest.approx(3.0)
    assert row["mean_chunks"] == pytest.approx(8 / 3)
    # TTFT sorted .1 .2 .3: p50 -> rank 2, p90 and p99 -> rank 3
    assert (row["ttft_p50_s"], row["ttft_p90_s"], row["ttft_p99_s"]) == (0.2, 0.3, 0.3)
    # gaps sorted .05 .1 .2 .3 .3: p50 -> rank 3 (.2), p90 -> rank 5 (.3)
    assert row["itl_p50_s"] == pytest.approx(0.2)
    assert row["itl_p90_s"] == pytest.approx(0.3)
    assert row["itl_p99_s"] == pytest.approx(0.3)
    assert row["latency_p50_s"] == 0.5


def test_one_chunk_answers_have_no_itl_and_the_table_says_so():
    answers = [{"ttft": 0.25, "latency": 0.25, "chunks": [0.25], "tokens": 1}]
    row = summarise(answers, clients=1, wall=0.5)
    assert row["itl_gaps"] == 0 and row["itl_p50_s"] is None
    lines = table([row]).splitlines()
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == 13
    assert lines[2] == "| 1 | 1 | 2.00 | 2.0 | 250.0 | 250.0 | 250.0 | - | - | - | 0.25 | 1.0 |"
