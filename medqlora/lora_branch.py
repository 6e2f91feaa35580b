"""LoRA's A projection with dropout, keeping no dropped copy for backward.

    low = dropped_linear(x, lora_A.weight, p)     # == F.linear(dropout(x, p), lora_A.weight)

peft computes lora_A(lora_dropout(x)). Autograd then keeps, for every adapted projection, the
dropped tensor (tokens x in_features; A's gradient needs it) and the dropout's mask (x's
gradient needs it): q, k and v each keep their own dropped copy of the same normed hidden
states, gate and up theirs of the next ones. For Mistral-7B that is a third of what an
un-recomputed decoder layer keeps (1.63 GiB at 8,192 tokens, 1.09 without; bench/README.md).

Here backward gets x itself (one tensor the projections share) and the random generator's
state from before the dropout, and replays the dropout: torch.native_dropout again from that
state gives the same mask, bit for bit. It is also the mask peft's nn.Dropout would draw from
the same state (F.dropout runs native_dropout on CUDA; on CPU its bernoulli draws are
native_dropout's), so a run with this and a run with peft's forward see the same masks and
compute the same loss (tests/test_fastpath.py checks it, dropout 0.1, on CPU).
Activation checkpointing restores the generator before it recomputes a layer, so a recomputed
forward draws the same masks again. The generator calls cannot be captured in a CUDA graph.
"""
from __future__ import annotations

import torch


def _generator(device: torch.device) -> torch.Generator:
    """The default generator dropout draws from on `device`."""
    if device.type == "cpu":
        return torch.default_generator
    module = torch.get_device_module(device.type)
    return module.default_generators[device.index if device.index is not None
                                     else module.current_device()]


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would run in: autocast's where it is on, else the weight's (peft
    casts the dropped input to the adapter's dtype when autocast is off)."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return weight.dtype


class _DroppedLinear(torch.autograd.Function):
    """F.linear(dropout(x), weight) saving x and the generator state instead of the dropout's
    output and mask."""

    @staticmethod
    def forward(ctx, x, weight, p: float, dtype: torch.dtype):
        generator = _generator(x.device)
        ctx.rng_state = generator.get_state()
        ctx.p, ctx.dtype = p, dtype
        dropped, _ = torch.native_dropout(x, p, True)
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.linear(dropped.to(dtype), weight.to(dtype))

    @staticmethod
    def backward(ctx, grad_low):
        x, weight = ctx.saved_tensors
        generator = _generator(x.device)
        now = generator.get_state()
        generator.set_state(ctx.rng_state)
        try:
            dropped, mask = torch.native_dropout(x, ctx.p, True)
        finally:
            generator.set_state(now)
        grad_x = grad_weight = None
        grad_2d = grad_low.reshape(-1, grad_low.shape[-1])
        if ctx.needs_input_grad[1]:
            dropped_2d = dropped.reshape(-1, dropped.shape[-1]).to(ctx.dtype)
            grad_weight = (grad_2d.t() @ dropped_2d).to(weight.dtype)
        del dropped
        if ctx.needs_input_grad[0]:
            grad_dropped = (grad_low @ weight.to(ctx.dtype)).to(x.dtype)
            grad_x = torch.ops.aten.native_dropout_backward(grad_dropped, mask, 1 / (1 - ctx.p))
        return grad_x, grad_weight, None, None


def dropped_linear(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """F.linear(dropout(x, p), weight) in training mode, in the dtype F.linear would use
    (autocast's, else the weight's); backward replays the dropout instead of keeping it."""
    if not 0 < p < 1:
        raise ValueError(f"dropped_linear: dropout p must be in (0, 1), got {p}")
    return _DroppedLinear.apply(x, weight, p, _compute_dtype(x, weight))
