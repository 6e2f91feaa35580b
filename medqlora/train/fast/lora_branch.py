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
forward draws the same masks again. The generator calls cannot be captured in a CUDA graph:
seeded_dropped_linear (below) is the variant a graph can hold. recomputed_dropped_linear keeps
neither: down_proj's input is rebuilt from the SwiGLU's gate and up in backward.
"""
from __future__ import annotations

import functools
import importlib.util

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


class _DroppedA(torch.autograd.Function):
    """F.linear(dropout(x), weight) that keeps neither the dropout's output nor its mask.

    mode "replay": backward restores the generator state saved here and redraws the mask;
    "seeded": the mask is seeded_dropout's, from a seed tensor drawn here; "none": p = 0.
    With `recompute`, x itself is not kept either: backward rebuilds it as recompute(*sources)
    from tensors autograd keeps anyway (the SwiGLU's gate and up for down_proj's input).
    """

    @staticmethod
    def forward(ctx, x, weight, p: float, dtype: torch.dtype, mode: str, recompute, *sources):
        ctx.p, ctx.dtype, ctx.mode, ctx.recompute = p, dtype, mode, recompute
        ctx.x_dtype = x.dtype
        seed = None
        if mode == "seeded":
            seed = torch.randint(0, 2**31 - 1, (1,), device=x.device)
            dropped = seeded_dropout(x, seed, p)
        elif mode == "replay":
            ctx.rng_state = _generator(x.device).get_state()
            dropped, _ = torch.native_dropout(x, p, True)
        else:
            dropped = x
        ctx.save_for_backward(weight, seed, *(sources if recompute else (x,)))
        return torch.nn.functional.linear(dropped.to(dtype), weight.to(dtype))

    @staticmethod
    def backward(ctx, grad_low):
        weight, seed, *kept = ctx.saved_tensors
        if ctx.recompute:
            with torch.no_grad():
                x = ctx.recompute(*kept)
        else:
            x = kept[0]
        p, mode = ctx.p, ctx.mode
        mask = None
        if mode == "seeded":
            dropped = seeded_dropout(x, seed, p)
        elif mode == "replay":
            generator = _generator(x.device)
            now = generator.get_state()
            generator.set_state(ctx.rng_state)
            try:
                dropped, mask = torch.native_dropout(x, p, True)
            finally:
                generator.set_state(now)
        else:
            dropped = x
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            dropped_2d = dropped.reshape(-1, dropped.shape[-1]).to(ctx.dtype)
            grad_weight = (grad_low.reshape(-1, grad_low.shape[-1]).t() @ dropped_2d) \
                .to(weight.dtype)
        del dropped, x
        if ctx.needs_input_grad[0]:
            grad_x = (grad_low @ weight.to(ctx.dtype)).to(ctx.x_dtype)
            if mode == "seeded":
                grad_x = seeded_dropout(grad_x, seed, p)
            elif mode == "replay":
                grad_x = torch.ops.aten.native_dropout_backward(grad_x, mask, 1 / (1 - p))
        return (grad_x, grad_weight, None, None, None, None) + (None,) * len(kept) * \
            bool(ctx.recompute)


DROPOUT_MODES = ("replay", "seeded", "peft")


def set_dropout_mode(root: torch.nn.Module, mode: str) -> int:
    """How the fused LoRA branches under `root` (the projections fastpath.fuse_lora patched,
    which carry `_peft_forward`) drop their input: "replay" (dropped_linear), "seeded"
    (seeded_dropped_linear, which a CUDA graph can hold) or "peft" (peft's dropout, its copies
    kept). Returns how many branches were set."""
    if mode not in DROPOUT_MODES:
        raise ValueError(f"dropout mode {mode!r}: expected one of {DROPOUT_MODES}")
    count = 0
    for module in root.modules():
        if hasattr(module, "_peft_forward"):
            module.dropout_mode = mode
            count += 1
    return count


def _check_p(p: float, name: str) -> None:
    if not 0 < p < 1:
        raise ValueError(f"{name}: dropout p must be in (0, 1), got {p}")


def dropped_linear(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """F.linear(dropout(x, p), weight) in training mode, in the dtype F.linear would use
    (autocast's, else the weight's); backward replays the dropout instead of keeping it."""
    _check_p(p, "dropped_linear")
    return _DroppedA.apply(x, weight, p, _compute_dtype(x, weight), "replay", None)


def recomputed_dropped_linear(x: torch.Tensor, weight: torch.Tensor, p: float, mode: str,
                              recompute, *sources: torch.Tensor) -> torch.Tensor:
    """F.linear(dropout(x, p), weight) keeping `sources` instead of x, where
    x == recompute(*sources) (bit for bit: the same function made x). mode: "replay",
    "seeded" or "none" (p = 0). The gradient reaches x; sources get none from here."""
    if mode != "none":
        _check_p(p, "recomputed_dropped_linear")
    return _DroppedA.apply(x, weight, p, _compute_dtype(x, weight), mode, recompute, *sources)


# ---------------------------------------------------------------- seeded dropout (graph-safe)
# A CUDA graph cannot read or restore the generator's state from the host, so inside a graphed
# body (medqlora/train/fast/graphs.py) the mask is a pure function of a seed tensor and each element's
# index: the seed is drawn on the device (torch.randint: a graph replay draws a new one), kept
# for backward, and the mask recomputed from it. The same Bernoulli(1 - p) keep rate as peft's
# dropout, different draws. The hash is 32-bit integer arithmetic that the Triton kernel (CUDA)
# and the torch version below (any device; the reference the kernel is checked against) compute
# alike, bit for bit: lowbias-style xorshift-multiply with multipliers below 2^31, so the int64
# torch products never overflow.
_MASK32 = 0xFFFFFFFF
_SEED_MIX, _MUL1, _MUL2 = 0x61C88647, 0x7FEB352D, 0x5BD1E995


def _threshold(p: float) -> int:
    """Keep an element when the hash's top 24 bits are >= this (probability 1 - p)."""
    return int(round(p * (1 << 24)))


def keep_mask(seed: torch.Tensor, numel: int, p: float) -> torch.Tensor:
    """The seeded mask in plain torch: True where an element is kept (flat, `numel` long)."""
    h = torch.arange(numel, dtype=torch.int64, device=seed.device)
    h = (h + ((seed.to(torch.int64) * _SEED_MIX) & _MASK32)) & _MASK32
    h = h ^ (h >> 16)
    h = (h * _MUL1) & _MASK32
    h = h ^ (h >> 15)
    h = (h * _MUL2) & _MASK32
    h = h ^ (h >> 16)
    return (h >> 8) >= _threshold(p)


def _torch_seeded_dropout(t: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    keep = keep_mask(seed, t.numel(), p).view(t.shape)
    return torch.where(keep, t * (1 / (1 - p)), torch.zeros((), dtype=t.dtype, device=t.device))


@functools.cache
def _triton_kernel():
    """The Triton version of _torch_seeded_dropout, built on first use (CUDA only)."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, out_ptr, seed_ptr, numel, threshold, scale, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < numel
        seed = tl.load(seed_ptr).to(tl.uint32)
        h = offsets.to(tl.uint32) + seed * 0x61C88647
        h = h ^ (h >> 16)
        h = h * 0x7FEB352D
        h = h ^ (h >> 15)
        h = h * 0x5BD1E995
        h = h ^ (h >> 16)
        keep = (h >> 8) >= threshold
        x = tl.load(x_ptr + offsets, mask=inside)
        y = tl.where(keep, x.to(tl.float32) * scale, 0.0)
        tl.store(out_ptr + offsets, y.to(x.dtype), mask=inside)

    return kernel


def seeded_dropout(t: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """dropout(t, p) with the mask keep_mask(seed, ...): the Triton kernel on CUDA, torch
    elsewhere. Applying it to a gradient applies the same mask (dropout's backward)."""
    if t.is_cuda and _triton_available():
        t = t.contiguous()
        out = torch.empty_like(t)
        block = 1024
        _triton_kernel()[(-(-t.numel() // block),)](
            t, out, seed, t.numel(), _threshold(p), 1 / (1 - p), BLOCK=block)
        return out
    return _torch_seeded_dropout(t, seed, p)


@functools.cache
def _triton_available() -> bool:
    """Looked up once: seeded_dropout asks on every call (7 projections a layer)."""
    return importlib.util.find_spec("triton") is not None


def seeded_dropped_linear(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """dropped_linear with a seeded mask instead of the generator's: no host-side generator
    calls, so a CUDA graph can capture it (see above)."""
    _check_p(p, "seeded_dropped_linear")
    return _DroppedA.apply(x, weight, p, _compute_dtype(x, weight), "seeded", None)
