"""Document-masked attention (medqlora/train/fast/attention.py) equals sdpa under a block-diagonal mask.

The CUDA kernel (torch varlen_attn) is checked against the padded reference by
bench/bench_train.py's parity rows on a GPU; here the CPU implementation of the same contract,
and the reshaping around it, are checked against transformers' own sdpa attention.
"""
from __future__ import annotations

import types

import pytest
import torch

from medqlora.train.fast import attention


def _block_causal(lengths, window=None):
    """(T, T) bool: causal within each example, optionally a sliding window."""
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.cat([torch.arange(n) for n in lengths])
    gap = pos[:, None] - pos[None, :]
    mask = (doc[:, None] == doc[None, :]) & (gap >= 0)
    return mask & (gap < window) if window else mask


def test_document_boundaries_flatten_rows():
    positions = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]])
    out = attention.document_boundaries(positions)
    assert out["cu_seq_lens_q"].tolist() == [0, 3, 5, 9, 10]
    assert out["cu_seq_lens_q"].dtype == torch.int32
    assert out["max_length_q"] == out["max_length_k"] == 4


@pytest.mark.parametrize("window", [None, 3])
def test_reference_varlen_equals_masked_sdpa_with_gqa(window):
    torch.manual_seed(0)
    lengths = [5, 1, 7, 3]
    total = sum(lengths)
    q = torch.randn(total, 4, 8, dtype=torch.float64)
    k, v = torch.randn(total, 2, 8, dtype=torch.float64), torch.randn(total, 2, 8, dtype=torch.float64)
    cu = torch.tensor([0, 5, 6, 13, 16], dtype=torch.int32)
    out = attention.reference_varlen(q, k, v, cu, cu, 7, 7, scale=0.3,
                                     window_size=attention._window(window), enable_gqa=True)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1),
        v.repeat_interleave(2, 1).transpose(0, 1), attn_mask=_block_causal(lengths, window),
        scale=0.3).transpose(0, 1)
    torch.testing.assert_close(out, dense)


def test_attention_function_matches_transformers_sdpa_on_packed_rows():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    torch.manual_seed(1)
    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=2, training=False)
    q = torch.randn(2, 4, 6, 8, dtype=torch.float64)           # batch, heads, seq, dim
    k, v = torch.randn(2, 2, 6, 8, dtype=torch.float64), torch.randn(2, 2, 6, 8, dtype=torch.float64)
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    kwargs = attention.document_boundaries(positions)
    out, _ = attention.varlen_attention_forward(module, q, k, v, None, scaling=0.5, **kwargs)
    # transformers' sdpa with the block-diagonal mask it builds from packed position ids
    mask = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    mask[0, 0] = _block_causal([3, 2, 1])
    mask[1, 0] = _block_causal([6])
    ref, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, k, v, mask, scaling=0.5)
    assert out.shape == ref.shape == (2, 6, 4, 8)
    torch.testing.assert_close(out, ref)
    # without boundaries (evaluation, padded rows) it is transformers' sdpa, unchanged
    plain, _ = attention.varlen_attention_forward(module, q, k, v, mask, scaling=0.5)
    torch.testing.assert_close(plain, ref)


def test_kernel_name_says_what_runs():
    assert attention.kernel_name("cpu") == "sdpa per example"
