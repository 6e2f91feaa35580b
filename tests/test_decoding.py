"""The continuous-batching decoder (medqlora/evaluate/decoding.py) on the embedded tiny model.

Every answer is checked against transformers' own `model.generate`, one prompt at a time with
no padding: greedy tokens must be equal whatever the batch, the slot count, the cache width
(tight widths force compaction and right shifts; the tests count that they happened), the
moment a request joins, a stop token or a cancelled neighbour. Sampling is checked against the
same request decoded alone (a per-request generator: the batch must not change the draw).

    .venv/bin/python -m pytest -q -p no:randomly tests/test_decoding.py
"""
from __future__ import annotations

import re

import pytest
import torch
from conftest import TINY_MODEL

from medqlora.evaluate import decoding
from medqlora.evaluate.decoding import Decoder, Request

PAD = 3   # the tiny model's pad_token_id
# Prompt lengths, short and long mixed, so a longer prompt joins after shorter ones run (a
# right shift) and rows start at different columns (compaction drops the oldest row's start).
# With this order, 2 and 3 rows at the tight width each compact and right-shift running rows.
LENGTHS = (9, 7, 11, 1, 5, 3, 16)
NEW = (4, 8, 3, 1, 5, 6, 9)        # max_new_tokens per prompt; 16 + 9 = 25 = the tight width
TIGHT = max(n + k for n, k in zip(LENGTHS, NEW))   # = 25


def _prompts(lengths=LENGTHS, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 4096, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(TINY_MODEL), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference(model):
    """reference(prompt, n): transformers' greedy continuation, one prompt, no padding, no eos."""
    memo: dict = {}

    def run(prompt, n):
        key = (tuple(prompt), n)
        if key not in memo:
            ids = torch.tensor([prompt])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=n, do_sample=False, eos_token_id=None,
                                 pad_token_id=PAD)
            memo[key] = out[0, len(prompt):].tolist()
            assert len(memo[key]) == n    # no eos: generate ran the full length
        return memo[key]
    return run


@pytest.fixture
def moves(monkeypatch):
    """Counts of cache moves that carried a running row: compactions and right shifts."""
    counts = {"compact": 0, "shift": 0, "compact_idle": 0, "shift_idle": 0}
    compact, shift = Decoder._compact, Decoder._shift

    def counted_compact(self):
        running = any(r is not None for r in self.slots)
        moved = compact(self)
        if moved:
            counts["compact" if running else "compact_idle"] += 1
        return moved

    def counted_shift(self, by):
        running = any(r is not None for r in self.slots)
        counts["shift" if running else "shift_idle"] += 1
        return shift(self, by)

    monkeypatch.setattr(Decoder, "_compact", counted_compact)
    monkeypatch.setattr(Decoder, "_shift", counted_shift)
    return counts


def _alone(model, prompt, n, **kwargs) -> Request:
    request = Request(list(prompt), n, **kwargs)
    Decoder(model, [], rows=1, columns=len(prompt) + n, pad_id=PAD).run([request])
    return request


def _check_rows(decoder: Decoder) -> None:
    """Each running row's keys fill columns [start, t) without a gap, and its mask marks exactly
    those: prompt + the tokens fed back so far (all but the newest)."""
    assert decoder.t <= decoder.columns
    for slot, request in enumerate(decoder.slots):
        if request is not None:
            assert request.slot == slot
            marked = decoder.mask[slot].nonzero().flatten().tolist()
            assert marked == list(range(request.start, decoder.t)), (slot, request.start)
            assert len(marked) == len(request.prompt_ids) + len(request.tokens) - 1


def _run_checked(decoder: Decoder, requests) -> None:
    for request in requests:
        decoder.submit(request)
    while decoder.busy:
        decoder.step()
        _check_rows(decoder)


def _cut(tokens, stops):
    """tokens up to (not including) the first stop id."""
    for k, token in enumerate(tokens):
        if token in stops:
            return tokens[:k]
    return tokens


# ---------------------------------------------------------------- greedy = model.generate

@pytest.mark.slow
@pytest.mark.parametrize("rows, columns, moved", [
    (8, 64, False),       # every prompt joins the first step: one shift from an empty cache
    (2, TIGHT, True),     # tight: rows leave and join, longer prompts shift running rows right
    (3, TIGHT, True),
    (1, TIGHT, False),    # one slot: it compacts only an empty cache (nothing running)
], ids=["roomy", "rows2-tight", "rows3-tight", "rows1-tight"])
def test_greedy_tokens_equal_generate(model, reference, moves, rows, columns, moved):
    prompts = _prompts()
    requests = [Request(p, n) for p, n in zip(prompts, NEW)]
    decoder = Decoder(model, [], rows=rows, columns=columns, pad_id=PAD)
    _run_checked(decoder, requests)
    assert [r.tokens for r in requests] == [reference(p, n) for p, n in zip(prompts, NEW)]
    assert [r.finish for r in requests] == ["length"] * len(prompts)
    assert decoder.slots == [None] * rows and not decoder.busy
    # the tight settings went through both paths that move running rows (>= 1 each)
    assert (moves["compact"] >= 1, moves["shift"] >= 1) == (moved, moved), moves
    if rows == 8:
        assert moves == {"compact": 0, "shift": 0, "compact_idle": 0, "shift_idle": 1}
        assert decoder.steps == max(NEW) - 1    # one prefill, then decode until the longest
    if rows == 1:
        assert moves["compact_idle"] >= 1, moves   # t went back to 0 for a later request


@pytest.mark.slow
@pytest.mark.parametrize("length, shifted", [(2, False), (20, True)],
                         ids=["short-joins", "long-joins-shifts-running-rows"])
def test_request_joining_mid_decode_gets_its_alone_tokens(model, reference, moves, length,
                                                          shifted):
    first, second, late = _prompts((3, 5, length), seed=1)
    running = [Request(first, 8), Request(second, 6)]
    decoder = Decoder(model, [], rows=3, columns=28, pad_id=PAD)
    for request in running:
        decoder.submit(request)
    for _ in range(3):
        decoder.step()
        _check_rows(decoder)
    assert decoder.t == 5 + 3 and [len(r.tokens) for r in running] == [4, 4]
    joining = Request(late, 6)
    decoder.submit(joining)
    starts = [r.start for r in running]
    touched = decoder.step()
    assert joining in touched and len(joining.tokens) == 2   # prefill's token + one decode step
    # a 20-token prompt needs t >= 20: the running rows moved right by 20 - 8 = 12 columns
    assert [r.start - s for r, s in zip(running, starts)] == ([12, 12] if shifted else [0, 0])
    assert moves["shift"] == int(shifted)
    _check_rows(decoder)
    _run_checked(decoder, [])
    assert joining.tokens == reference(late, 6) == _alone(model, late, 6).tokens
    assert [r.tokens for r in running] == [reference(first, 8), reference(second, 6)]


# ---------------------------------------------------------------- stop tokens

@pytest.mark.slow
@pytest.mark.parametrize("k", [0, 3], ids=["stop-at-prefill", "stop-at-step-3"])
def test_stop_token_ends_the_row_and_frees_its_slot(model, reference, k):
    prompts = _prompts((6, 4, 9), seed=2)
    n = 8
    refs = [reference(p, n) for p in prompts]
    # the stop id: the token greedy decoding gives the first prompt at step k, first seen there
    stop = refs[0][k]
    assert stop not in refs[0][:k], "pick another prompt: the stop id shows up before step k"
    requests = [Request(p, n) for p in prompts]
    decoder = Decoder(model, [stop], rows=2, columns=9 + n, pad_id=PAD)
    for request in requests:
        decoder.submit(request)
    decoder.step()
    # two rows: the third waits; at k = 0 the first row already stopped at its prefill
    assert decoder.slots == [None if k == 0 else requests[0], requests[1]]
    assert list(decoder.waiting) == [requests[2]]
    while not requests[0].done:
        decoder.step()
    assert requests[0].finish == "stop"
    assert requests[0].tokens == refs[0][:k]          # the stop token itself is not appended
    assert requests[0].slot is None
    # the freed slot goes to the waiting request (at the step it joins)
    while requests[2] in decoder.waiting:
        assert decoder.slots[0] is None
        decoder.step()
    assert decoder.slots[0] is requests[2]
    while decoder.busy:
        decoder.step()
    for request, ref in zip(requests[1:], refs[1:]):
        assert request.tokens == _cut(ref, {stop})
        assert request.finish == ("stop" if stop in ref else "length")
    assert decoder.slots == [None, None] and not decoder.busy


# ---------------------------------------------------------------- sampling

@pytest.mark.slow
def test_sampling_is_seeded_per_request_not_per_batch(model, reference):
    prompts = _prompts((5, 8, 3, 12), seed=3)
    n = 10
    alone = [_alone(model, p, n, do_sample=True, seed=s).tokens for s, p in enumerate(prompts)]
    same_prompt = [_alone(model, prompts[0], n, do_sample=True, seed=s).tokens for s in range(4)]
    # in a batch, with a greedy neighbour and a different join order
    batch = [Request(p, n, do_sample=True, seed=s) for s, p in enumerate(prompts)]
    greedy = Request(prompts[1], n)
    decoder = Decoder(model, [], rows=3, columns=12 + n, pad_id=PAD)
    decoder.run([batch[3], greedy, batch[1], batch[0], batch[2]])
    assert [r.tokens for r in batch] == alone
    assert greedy.tokens == reference(prompts[1], n)
    # the seed matters: four seeds on one prompt draw at least two different answers,
    # and sampling at temperature 1 is not greedy decoding
    assert len({tuple(t) for t in same_prompt}) > 1
    assert alone[0] != reference(prompts[0], n)


@pytest.mark.slow
@pytest.mark.parametrize("settings", [{"temperature": 1e-4}, {"top_p": 1e-3}],
                         ids=["temperature-1e-4", "top_p-1e-3"])
def test_sampling_that_keeps_only_the_top_token_is_greedy(model, reference, settings):
    prompts = _prompts((5, 8, 3, 12), seed=3)
    n = 10
    requests = [Request(p, n, do_sample=True, seed=s, **settings) for s, p in enumerate(prompts)]
    Decoder(model, [], rows=2, columns=12 + n, pad_id=PAD).run(requests)
    assert [r.tokens for r in requests] == [reference(p, n) for p in prompts]


# ---------------------------------------------------------------- cancel

@pytest.mark.slow
def test_cancel_frees_a_running_slot_and_drops_a_waiting_request(model, reference):
    prompts = _prompts((4, 7, 6, 5), seed=4)
    n = 8
    a, b, c, d = (Request(p, n) for p in prompts)
    # 4 spare columns: c joins at t = 9 beside b (9 + 7 steps <= 7 + 8 + 4), no compaction
    decoder = Decoder(model, [], rows=2, columns=7 + n + 4, pad_id=PAD)
    for request in (a, b, c, d):
        decoder.submit(request)
    decoder.step()
    decoder.step()
    assert decoder.slots == [a, b] and list(decoder.waiting) == [c, d]
    decoder.cancel(a)                     # running
    assert a.finish == "cancelled" and a.slot is None and decoder.slots == [None, b]
    assert a.tokens == reference(prompts[0], n)[:3] and not decoder.mask[0].any()
    decoder.cancel(d)                     # waiting
    assert d.finish == "cancelled" and list(decoder.waiting) == [c] and d.tokens == []
    decoder.step()
    assert decoder.slots == [c, b]        # c took the cancelled row's slot
    while decoder.busy:
        decoder.step()
    assert a.tokens == reference(prompts[0], n)[:3] and d.tokens == []
    assert (b.tokens, c.tokens) == (reference(prompts[1], n), reference(prompts[2], n))
    assert (b.finish, c.finish) == ("length", "length")
    decoder.cancel(b)                     # already finished: no change
    assert b.finish == "length"


# ---------------------------------------------------------------- submit refuses

class _NoModel:
    """Enough of a model for Decoder.__init__ and submit (which run no forward)."""

    def parameters(self):
        return iter([torch.zeros(1)])

    def forward(self, input_ids, past_key_values=None):
        raise RuntimeError("submit must not run the model")


@pytest.mark.parametrize("prompt, n, message", [
    ([], 4, "an empty prompt cannot be decoded"),
    ([5, 6], 0, "max_new_tokens must be at least 1, got 0"),
    ([5, 6], -2, "max_new_tokens must be at least 1, got -2"),
    ([7] * 20, 5, ("prompt (20 tokens) + max_new_tokens (5) = 25 positions; "
                   "the decoder has 24")),
], ids=["empty-prompt", "zero-new-tokens", "negative-new-tokens", "past-the-columns"])
def test_submit_refuses_what_cannot_be_decoded(prompt, n, message):
    decoder = Decoder(_NoModel(), [2], rows=2, columns=24)
    with pytest.raises(ValueError, match=re.escape(message)):
        decoder.submit(Request(prompt, n))
    assert not decoder.busy
    decoder.submit(Request([7] * 20, 4))      # 20 + 4 = 24 columns: fits exactly
    assert len(decoder.waiting) == 1


# ---------------------------------------------------------------- decode attention

def test_decode_attention_packed_heads_equal_repeated_kv_sdpa():
    torch.manual_seed(5)
    q = torch.randn(3, 8, 1, 16, dtype=torch.float64)       # rows, 8 query heads, one position
    k, v = torch.randn(3, 2, 10, 16, dtype=torch.float64), torch.randn(3, 2, 10, 16,
                                                                         dtype=torch.float64)
    mask = torch.rand(3, 1, 1, 10) < 0.6
    mask[:, :, :, 4] = True                                   # every row attends to something
    out, weights = decoding.decode_attention(None, q, k, v, mask, scaling=0.25)
    # transformers' convention: query head h reads key/value head h // groups
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=mask, scale=0.25)
    assert out.shape == (3, 1, 8, 16) and weights is None
    torch.testing.assert_close(out, dense.transpose(1, 2))


@pytest.mark.slow
def test_decode_steps_run_through_decode_attention(model, reference, monkeypatch):
    calls = []

    def counted(module, query, key, value, *args, **kwargs):
        calls.append((query.shape[2], query.shape[1] // key.shape[1]))
        return original(module, query, key, value, *args, **kwargs)

    original = decoding.decode_attention
    monkeypatch.setattr(decoding, "decode_attention", counted)
    try:
        prompts = _prompts((4, 9), seed=6)
        requests = [Request(p, 5) for p in prompts]
        decoder = Decoder(model, [], rows=2, columns=14, pad_id=PAD)   # registers `counted`
        decoder.run(requests)
    finally:
        monkeypatch.undo()
        decoding._register_attention()     # the real function back in transformers' registry
    layers = model.config.num_hidden_layers
    # 4 layers x 4 decode steps (the prefill gives the first token with the model's own
    # attention); every call is one query position with 2 query heads per key/value head
    assert decoder.steps == 4
    assert calls == [(1, 2)] * (layers * decoder.steps)
    assert model.config._attn_implementation == "sdpa"     # restored after each step
    assert [r.tokens for r in requests] == [reference(p, 5) for p in prompts]


# ---------------------------------------------------------------- generation.generate_tokens

@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(TINY_MODEL))


TEXTS = ["What is the first-line treatment for uncomplicated hypertension?",
         "Fever",
         "A 54-year-old man presents with crushing chest pain radiating to the left arm.",
         "List three signs of dehydration in children.",
         "Define sepsis."]


@pytest.mark.slow
def test_generate_tokens_equals_generate_cut_at_the_first_stop(model, tokenizer, reference):
    from medqlora.evaluate import generation
    if "Decoder" not in vars(generation):
        pytest.skip("generation.generate_tokens does not use the Decoder yet")
    ids = [tokenizer(text)["input_ids"] for text in TEXTS]
    n = 12
    refs = [reference(p, n) for p in ids]
    settings = generation.GenerationSettings(max_new_tokens=n, do_sample=False,
                                             temperature=1.0, top_p=1.0, batch_size=2, seed=0)
    config = generation.generation_config(settings, tokenizer)
    assert config.eos_token_id == [tokenizer.eos_token_id]
    # the tiny model rarely says eos: add a token the third prompt's answer has at step 4
    stop = refs[2][4]
    config.eos_token_id = [tokenizer.eos_token_id, stop]
    stops = set(config.eos_token_id)
    out = generation.generate_tokens(model, tokenizer, ids, settings, config)
    assert out == [_cut(ref, stops) for ref in refs]
    assert len(out[2]) <= 4 and [len(t) for t in out].count(n) >= 1   # some stop, some run out


@pytest.mark.slow
def test_generate_tokens_sampling_does_not_depend_on_batch_size(model, tokenizer):
    from medqlora.evaluate import generation
    if "Decoder" not in vars(generation):
        pytest.skip("generation.generate_tokens does not use the Decoder yet")
    ids = [tokenizer(text)["input_ids"] for text in TEXTS]
    out = {}
    for rows in (1, 3):
        settings = generation.GenerationSettings(max_new_tokens=8, do_sample=True,
                                                 temperature=1.0, top_p=0.9, batch_size=rows,
                                                 seed=7)
        out[rows] = generation.generate_tokens(model, tokenizer, ids, settings)
    # prompt i is sampled with seed 7 + i, as alone in a one-slot decoder
    alone = [_alone(model, p, 8, do_sample=True, temperature=1.0, top_p=0.9, seed=7 + i).tokens
             for i, p in enumerate(ids)]
    assert out[1] == out[3] == [_cut(t, {tokenizer.eos_token_id}) for t in alone]


@pytest.mark.slow
def test_a_decode_step_that_cannot_be_captured_falls_back_to_eager(model, reference, caplog):
    """graphs on where CUDA graphs cannot run (here: no GPU, so capturing raises): the decoder
    says so once, decodes eagerly, and the tokens are unchanged; warm() takes the same path."""
    prompts = _prompts()
    decoder = Decoder(model, [], rows=4, columns=TIGHT, pad_id=PAD, graphs=True)
    with caplog.at_level("WARNING", logger="medqlora.evaluate.decoding"):
        decoder.warm(prompts[0])
        requests = [Request(p, n) for p, n in zip(prompts, NEW)]
        decoder.run(requests)
    assert [r.tokens for r in requests] == [reference(p, n) for p, n in zip(prompts, NEW)]
    assert decoder.graphs is False and decoder.captured == {}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith(
        "decode step not capturable as a CUDA graph (")
