"""Document-masked attention: packed training rows cost the attention of their real examples.

    attention.use_varlen(model)     # fastpath.apply, when train.fast_path.varlen_attention

A packed row of 2048 tokens holding examples of 700, 600, 500 and 248 tokens needs causal
attention within each example only: sum(s_i^2) = 0.49 + 0.36 + 0.25 + 0.06 = 1.16M score
pairs, against 2048^2 = 4.19M for the whole row under a block-diagonal mask (sdpa computes
the masked-out blocks too, and a dense mask rules out its flash kernel). The collator marks
where each example starts (`document_boundaries`, transformers' flash-attention kwarg names
`cu_seq_lens_q/k` and `max_length_q/k`); the model passes them down to the attention function
registered here under NAME (transformers' AttentionInterface), which runs
 - on CUDA: PyTorch's variable-length flash attention, torch.nn.attention.varlen.varlen_attn;
 - elsewhere: the same attention example by example with sdpa (exact; the CPU parity test);
 - for a batch with no boundaries (evaluation, padded rows): transformers' sdpa, unchanged.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

NAME = "medqlora_varlen"


# ---------------------------------------------------------------- boundaries (collator side)

def document_boundaries(position_ids: torch.Tensor) -> dict[str, Any]:
    """cu_seq_lens/max_length for a batch whose position ids restart at 0 at each example.

    The rows are read as one flattened sequence (row-major, as the attention flattens them):
    positions [[0,1,2,0,1],[0,1,2,3,0]] -> examples of 3, 2, 4, 1 -> cu [0,3,5,9,10], max 4.
    A row's padding, given positions 0..k-1 by the collator, is one more (fully masked) example.
    """
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    cu = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest,
            "max_length_k": longest}


# ---------------------------------------------------------------- kernels

def _window(sliding_window: int | None) -> tuple[int, int]:
    """(left, right) for a causal window: a query sees itself and sliding_window - 1 before
    it, transformers' sliding mask (kv > q - W); (-1, 0) is plain causal."""
    return (sliding_window - 1, 0) if sliding_window else (-1, 0)


def reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                     window_size=(-1, 0), enable_gqa=False):
    """varlen_attn's contract computed example by example with sdpa (any device, exact).

    query (T, Hq, D), key/value (T, Hkv, D); returns (T, Hq, D).
    """
    bounds = cu_seq_q.tolist()
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        mask = None
        if window_size[0] >= 0 and end - start > window_size[0] + 1:
            pos = torch.arange(end - start, device=query.device)
            gap = pos[:, None] - pos[None, :]
            mask = (gap >= 0) & (gap <= window_size[0])
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=enable_gqa)
        pieces.append(out.transpose(0, 1))
    return torch.cat(pieces, dim=0)


@functools.lru_cache(maxsize=None)
def _cuda_kernel():
    """(varlen_attn, takes enable_gqa) or None where this torch has no varlen attention."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, "enable_gqa" in inspect.signature(varlen_attn).parameters


def kernel_name(device: str) -> str:
    """What attention runs for packed batches on `device`, as meta.json records it."""
    if device == "cuda" and _cuda_kernel() is not None:
        return "torch.nn.attention.varlen.varlen_attn"
    return "sdpa per example"


def varlen_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                             scaling=None, sliding_window=None, **kwargs):
    """transformers attention function: (batch, heads, seq, dim) in, (batch, seq, heads, dim) out."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or dropout > 0:  # no boundaries, or attention dropout the kernel lacks
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask,
                                               dropout=dropout, scaling=scaling,
                                               sliding_window=sliding_window, **kwargs)
    batch, heads, seq, dim = query.shape
    flat = lambda t: t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim)  # noqa: E731
    q, k, v = flat(query), flat(key), flat(value)
    cu = cu.to(device=q.device, dtype=torch.int32)
    longest = int(kwargs["max_length_q"])
    gqa = k.shape[1] != heads
    cuda = _cuda_kernel() if q.is_cuda else None
    if cuda is None:
        out = reference_varlen(q, k, v, cu, cu, longest, longest, scale=scaling,
                               window_size=_window(sliding_window), enable_gqa=gqa)
    else:
        kernel, takes_gqa = cuda
        if gqa and not takes_gqa:  # older torch: one key/value head per query head
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
        extra = {"enable_gqa": True} if gqa and takes_gqa else {}
        out = kernel(q, k, v, cu, cu, longest, longest, scale=scaling,
                     window_size=_window(sliding_window), **extra)
    return out.view(batch, seq, heads, dim), None


# ---------------------------------------------------------------- switching a model to it

def register() -> None:
    """Register NAME with transformers (idempotent). Its masks are sdpa's, for the batches
    without boundaries; packed batches ignore the mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_varlen(model) -> str:
    """Switch a (peft-wrapped) transformers model to NAME; returns the implementation it had."""
    register()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    base.set_attn_implementation(NAME)
    return before
