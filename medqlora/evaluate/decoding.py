"""The decoding engine: continuous batching over a slotted KV cache, one step at a time.

    decoder = Decoder(model, stop_ids(tokenizer), rows=64, columns=1024)
    decoder.submit(Request(prompt_ids, max_new_tokens=512))
    while decoder.busy:
        for request in decoder.step(): ...     # requests that got a token or finished

Used by evaluate, `medqlora generate` and serve (generation.generate_tokens, serve's engine):
one path, so what evaluate scores is what serve answers.

How it works. The cache holds `rows` slots of `columns` positions for every layer. All rows
write their new token's keys and values to the same column `t` each step, so one decode step
is one fixed-shape forward over the rows: on a GPU it is captured once as a CUDA graph per
batch bucket and replayed (no per-layer Python, no per-layer kernel launches: the overhead that
made an unmerged LoRA decode 4.6x slower than a merged one). A request joins between steps: its
prompt is prefilled (batched with the other joiners, left-padded, the model's own cache), and
its keys and values are copied into a free slot right-aligned at `t`, columns [t - L, t).
A mask per row marks its own columns; its positions count from 0 whatever column it sits in.
A row leaves at its end-of-sequence or end-of-turn token, at max_new_tokens, or when cancelled;
its slot is free for the next request at the next step. When the next step would run past the
last column, every row is shifted left by the oldest row's first column (compaction): a row
needs at most prompt + max_new_tokens columns, so `columns` = the longest prompt + the largest
max_new_tokens always suffices, and a request that cannot fit yet waits.

Sampling draws from a generator seeded per request, so an answer does not depend on what else
is in the batch. Greedy decoding picks the argmax (the first index on ties).

Decode attention packs grouped-query heads (the query heads sharing one key/value head become
positions of one query), so a masked decode step reads the cache once instead of repeating it
per group: transformers' sdpa path repeats keys and values whenever a mask is passed.
"""
from __future__ import annotations

import inspect
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

log = logging.getLogger(__name__)
ATTENTION = "medqlora_decode"   # the decode step's attention function (registered on first use)


@dataclass(eq=False)
class Request:
    """One prompt on its way through the decoder; `tokens` and `finish` are its results."""
    prompt_ids: list[int]
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None     # "stop" (eos / end of turn), "length" or "cancelled"
    slot: int | None = None
    start: int = 0                # the first cache column of the row
    generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish is not None


class SlotCache:
    """Keys and values [rows, kv heads, columns, head dim] per layer; the model's attention calls
    `update` once per layer and step, and every row writes the same column, `column`."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values
        self.column = torch.zeros(1, dtype=torch.long, device=keys[0].device)
        self.rows = keys[0].shape[0]   # the rows the model sees this step (a prefix of slots)
        self.is_sliding = [False] * len(keys)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx][:self.rows], self.values[layer_idx][:self.rows]
        keys.index_copy_(2, self.column, key_states.to(keys.dtype))
        values.index_copy_(2, self.column, value_states.to(values.dtype))
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[0].shape[2]

    def buffers(self) -> list[torch.Tensor]:
        return [*self.keys, *self.values]


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs):
    """Attention of the decode step (query length 1): grouped-query heads packed as positions."""
    batch, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    if length == 1 and groups > 1:
        packed = query.view(batch, key.shape[1], groups, dim)
        out = torch.nn.functional.scaled_dot_product_attention(
            packed, key, value, attn_mask=attention_mask, scale=scaling)
        out = out.reshape(batch, heads, 1, dim)
    else:
        if groups > 1:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each row right-aligned: [pad pad 5 6 7] / [0 0 1 1 1]."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, width - len(row):] = torch.as_tensor(list(row), dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


def _register_attention() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(ATTENTION, decode_attention)


def _inner(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _cache_argument(model) -> str:
    """transformers 5.24 names the cache argument `cache`; 5.17 `past_key_values`."""
    params = inspect.signature(_inner(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(out):
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def _layer_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of one layer of transformers' DynamicCache."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]   # older transformers


def buckets(rows: int) -> list[int]:
    """Batch sizes a decode step is captured at: powers of two up to `rows`, and `rows`."""
    sizes, size = [], 1
    while size < rows:
        sizes.append(size)
        size *= 2
    return sizes + [rows]


class Decoder:
    """Continuous batching of Requests through `model` (see the module docstring).

    rows: slots decoded together. columns: cache positions per slot; a request needs
    len(prompt) + max_new_tokens of them. graphs: capture the decode step as CUDA graphs
    (default: on a GPU). prefill_tokens: padded prompt tokens prefilled in one forward.
    """

    def __init__(self, model, stops: Iterable[int], rows: int, columns: int, pad_id: int = 0,
                 graphs: bool | None = None, prefill_tokens: int = 16384):
        self.model, self.stops = model, set(stops) - {None}
        self.rows, self.columns, self.pad_id = rows, columns, pad_id
        self.prefill_tokens = prefill_tokens
        self.device = next(model.parameters()).device
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        self.slots: list[Request | None] = [None] * rows
        self.waiting: deque[Request] = deque()
        self.t = 0                                   # the column the next step writes
        self.cache: SlotCache | None = None
        self.mask = torch.zeros(rows, columns, dtype=torch.bool, device=self.device)
        self.input_ids = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        self.position_ids = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        self.captured: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.cache_arg = _cache_argument(model)
        self.steps = 0
        _register_attention()

    # ---------------------------------------------------------------- queue

    @property
    def active(self) -> list[Request]:
        return [r for r in self.slots if r is not None]

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots)

    def submit(self, request: Request) -> None:
        need = len(request.prompt_ids) + request.max_new_tokens
        if not request.prompt_ids:
            raise ValueError("an empty prompt cannot be decoded")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
        if need > self.columns:
            raise ValueError(f"prompt ({len(request.prompt_ids)} tokens) + max_new_tokens "
                             f"({request.max_new_tokens}) = {need} positions; the decoder has "
                             f"{self.columns}")
        if request.do_sample:
            request.generator = torch.Generator(device=self.device).manual_seed(request.seed)
        self.waiting.append(request)

    def cancel(self, request: Request) -> None:
        """Stop a request now (a client that went away): its slot is free for the next one."""
        if request.done:
            return
        request.finish = "cancelled"
        if request in self.waiting:
            self.waiting.remove(request)
        self._release(request)

    def _release(self, request: Request) -> None:
        if request.slot is not None and self.slots[request.slot] is request:
            self.slots[request.slot] = None
            self.mask[request.slot] = False
        request.slot = None

    # ---------------------------------------------------------------- one step

    @torch.no_grad()
    def step(self) -> list[Request]:
        """Admit waiting requests that fit (prefill: their first token), then one decode step
        for every row; returns the requests that got a token or finished."""
        touched = self._admit()
        rows = [r for r in self.slots if r is not None]
        if rows:
            self._decode(rows)
            touched.extend(r for r in rows if r not in touched)
        return touched

    def run(self, requests: Iterable[Request]) -> None:
        """Decode every request to its end (evaluate, `medqlora generate`)."""
        for request in requests:
            self.submit(request)
        while self.busy:
            self.step()

    def warm(self, prompt_ids: list[int]) -> None:
        """Allocate the cache and capture the decode step at every bucket (a server does this
        before its first request, so no request pays for a capture)."""
        self.run([Request(list(prompt_ids), 2)])
        for size in buckets(self.rows):
            if self.graphs and size not in self.captured:
                self._forward(size)   # captures (or falls back to eager), then one idle replay

    # ---------------------------------------------------------------- admission and prefill

    def _remaining(self, request: Request) -> int:
        """Decode steps (= columns) the request still needs."""
        return request.max_new_tokens - max(len(request.tokens), 1)

    def _fits(self, joining: list[Request], candidate: Request) -> bool:
        rows = [r for r in self.slots if r is not None]
        t = max([self.t] + [len(r.prompt_ids) for r in (*joining, candidate)])
        steps = max(self._remaining(r) for r in (*rows, *joining, candidate))
        return t + steps <= self.columns

    def _admit(self) -> list[Request]:
        free = [i for i, r in enumerate(self.slots) if r is None]
        joining: list[Request] = []
        while self.waiting and len(joining) < len(free):
            candidate = self.waiting[0]
            if not self._fits(joining, candidate):
                if joining or not self._compact() or not self._fits(joining, candidate):
                    break
            padded = (len(joining) + 1) * max(len(r.prompt_ids) for r in (*joining, candidate))
            if joining and padded > self.prefill_tokens:
                break
            joining.append(self.waiting.popleft())
        if not joining:
            return []
        width = max(len(r.prompt_ids) for r in joining)
        if width > self.t:
            self._shift(width - self.t)
        for request, slot in zip(joining, free):
            request.slot = slot
            self.slots[slot] = request
        self._prefill(joining)
        return joining

    def _prefill(self, joining: list[Request]) -> None:
        ids, mask = left_pad([r.prompt_ids for r in joining], self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1)
        cache = _output_cache(out)
        layers = len(cache.layers) if hasattr(cache, "layers") else len(cache.key_cache)
        if self.cache is None:
            self.cache = self._allocate(cache, layers)
        width = ids.shape[1]
        for layer in range(layers):
            keys, values = _layer_kv(cache, layer)
            for row, request in enumerate(joining):
                n, slot = len(request.prompt_ids), request.slot
                self.cache.keys[layer][slot, :, self.t - n:self.t] = keys[row, :, width - n:]
                self.cache.values[layer][slot, :, self.t - n:self.t] = values[row, :, width - n:]
        for request in joining:
            n = len(request.prompt_ids)
            self.mask[request.slot] = False
            self.mask[request.slot, self.t - n:self.t] = True
            request.start = self.t - n
        logits = out.logits[:, -1, :]
        del cache, out
        self._accept(joining, logits)

    def _allocate(self, cache, layers: int) -> SlotCache:
        keys, values = _layer_kv(cache, 0)
        shape = (self.rows, keys.shape[1], self.columns, keys.shape[3])
        make = [torch.zeros(shape, dtype=keys.dtype, device=self.device) for _ in range(2 * layers)]
        return SlotCache(make[:layers], make[layers:])

    # ---------------------------------------------------------------- cache moves

    def _move(self, source: slice, dest: slice) -> None:
        for buffer in self.cache.buffers() if self.cache else []:
            buffer[:, :, dest] = buffer[:, :, source].clone()
        self.mask[:, dest] = self.mask[:, source].clone()

    def _compact(self) -> bool:
        """Shift every row left by the oldest row's first column; False when nothing moves."""
        rows = [r for r in self.slots if r is not None]
        drop = min((r.start for r in rows), default=self.t)
        if drop == 0:
            return False
        self._move(slice(drop, self.t), slice(0, self.t - drop))
        self.mask[:, self.t - drop:] = False
        for request in rows:
            request.start -= drop
        self.t -= drop
        return True

    def _shift(self, by: int) -> None:
        """Shift every row right by `by` columns (a joining prompt longer than `t`)."""
        self._move(slice(0, self.t), slice(by, self.t + by))
        self.mask[:, :by] = False
        for request in self.slots:
            if request is not None:
                request.start += by
        self.t += by

    # ---------------------------------------------------------------- decode

    def _decode(self, rows: list[Request]) -> None:
        """Feed each row its last token at column t; choose the next."""
        slots = [r.slot for r in rows]
        index = torch.tensor(slots, device=self.device)
        self.input_ids[index, 0] = torch.tensor([r.tokens[-1] for r in rows], device=self.device)
        self.position_ids[index, 0] = torch.tensor(
            [len(r.prompt_ids) + len(r.tokens) - 1 for r in rows], device=self.device)
        size = next(b for b in buckets(self.rows) if b > max(slots))
        self.mask[:size, self.t] = True      # free slots in the bucket attend to something
        self.cache.column.fill_(self.t)
        logits = self._forward(size)
        self.t += 1
        self.steps += 1
        self._accept(rows, logits[index])

    def _forward(self, size: int) -> torch.Tensor:
        """Logits [size, vocab] of the decode step over the first `size` slots."""
        if not self.graphs:
            return self._eager(size)
        if size not in self.captured:
            try:
                self.captured[size] = self._capture(size)
            except Exception as err:  # noqa: BLE001 - a kernel that cannot be captured
                # (a host sync, an allocation pattern CUDA graphs refuse): decode eagerly
                log.warning("decode step not capturable as a CUDA graph (%s); decoding "
                            "eagerly", err)
                self.graphs = False
                return self._eager(size)
        graph, logits = self.captured[size]
        graph.replay()
        return logits

    def _eager(self, size: int) -> torch.Tensor:
        self.cache.rows = size
        config = _inner(self.model).config
        previous = config._attn_implementation
        config._attn_implementation = ATTENTION
        try:
            out = self.model(input_ids=self.input_ids[:size],
                             attention_mask=self.mask[:size, None, None, :],
                             position_ids=self.position_ids[:size], use_cache=True,
                             **{self.cache_arg: self.cache})
        finally:
            config._attn_implementation = previous
        return out.logits[:, -1, :]

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Record the decode step at `size` rows (two eager warm-up runs on a side stream first:
        they write column t with this step's own inputs, so nothing changes)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._eager(size)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._eager(size)
        self.pool = graph.pool()
        log.info("decode step captured as a CUDA graph at %d rows", size)
        return graph, logits

    # ---------------------------------------------------------------- choosing tokens

    def _accept(self, rows: list[Request], logits: torch.Tensor) -> None:
        """Append each row's next token; finish rows at a stop token or their length."""
        picks = logits.argmax(-1).tolist()
        for i, request in enumerate(rows):
            token = sample(logits[i], request) if request.do_sample else picks[i]
            if token in self.stops:
                request.finish = "stop"
            else:
                request.tokens.append(token)
                if len(request.tokens) >= request.max_new_tokens:
                    request.finish = "length"
            if request.done:
                self._release(request)


def sample(logits: torch.Tensor, request: Request) -> int:
    """One token from softmax(logits / temperature), within the top_p nucleus."""
    probs = torch.softmax(logits.float() / max(request.temperature, 1e-5), dim=-1)
    if request.top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        keep = ordered.cumsum(-1) - ordered < request.top_p   # the first token always stays
        probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
    return int(torch.multinomial(probs, 1, generator=request.generator))
