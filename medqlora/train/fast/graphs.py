"""Decoder layers replayed as CUDA graphs: small micro-batches without the host's launch cost.

    model.medqlora_graphs = graphs.capture_layers(layers, first=k)   # fastpath.apply

At 1 x 2048 tokens a Mistral-7B decoder layer is ~5 ms of kernels for a forward + backward but
~9 ms of Python and kernel launches (bench/profile_step.py): the GPU waits. Here layers k..N-1
become one graphed body (torch.cuda.make_graphed_callables): the first training forward
captures their forward and backward once, and every later micro-batch of the same shape
replays both as two graph launches (32 layers, one 2048-token row: 348 ms eager, 156 ms
graphed; bench/README.md). Layers 0..k-1 stay eager (and may be recomputed).

The body runs in place of layer k; layers k+1..N-1 then hand the body's output through. A
call the graph cannot serve -- eval, no grad, an attention mask, a KV cache, varlen
boundaries, another shape -- runs every layer eagerly, so correctness never depends on the
capture; `summary()` says how many micro-batches went which way and why. What the body needs
of its layers: no activation checkpointing (turned off here), and no host-side generator calls:
their LoRA dropout is lora_branch's seeded one (dropout_mode "seeded"), not the replay that
saves and restores the generator's state.

Memory: a graph's tensors live in its private pool, which torch.cuda.max_memory_allocated
does not see during replays; the train stage reports max_memory_reserved when graphs ran.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from medqlora.train.fast import lora_branch

log = logging.getLogger(__name__)
# what the model loop passes to every layer that the body does not read: positions (the
# attention takes them from position_embeddings) and the loss's settings; any other kwarg
# (a cache, varlen boundaries, ...) must be None or False
_IGNORED = {"position_ids", "cache_position", "num_items_in_batch", "chunk_mem_const"}


class _Body(torch.nn.Module):
    """Layers k..N-1 as one callable of (hidden, cos, sin), for make_graphed_callables."""

    def __init__(self, layers, forwards):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)   # their parameters: the graph's inputs
        self.forwards = forwards                      # the layers' own (unpatched) forwards

    def forward(self, hidden, cos, sin):
        for forward in self.forwards:
            hidden = forward(hidden, attention_mask=None, position_embeddings=(cos, sin))
        return hidden


@dataclass(eq=False)
class GraphedBody:
    """State shared by the patched forwards of layers k..N-1."""
    layers: list
    forwards: list
    graphed: Any = None
    key: tuple | None = None
    active: bool = False            # this forward pass went through the graph
    replays: int = 0
    eager_calls: int = 0
    failure: str | None = None
    declined: str | None = None     # why the last eager call could not use the graph
    kept: list = field(default_factory=list)   # tensors the graph reads: keep them alive

    def summary(self) -> dict:
        """What ran, for metrics/train.json and the bench: layers graphed, training
        micro-batches replayed, forwards run eagerly instead (evaluation's included), and why
        the last of those could not use the graph."""
        return {"layers": len(self.layers), "replays": self.replays,
                "eager_forwards": self.eager_calls, "declined": self.declined,
                "capture_failure": self.failure}

    # ------------------------------------------------------------ eligibility
    def _key(self, layer, hidden, attention_mask, kwargs) -> tuple | None:
        """The shape signature a graph serves, or None when this call must run eagerly."""
        cos_sin = kwargs.get("position_embeddings")
        checks = {"training": layer.training, "grad enabled": torch.is_grad_enabled(),
                  "on cuda": hidden.is_cuda, "no attention mask": attention_mask is None,
                  "position_embeddings given": cos_sin is not None}
        for name, value in kwargs.items():
            if name != "position_embeddings":
                checks[f"no {name}"] = name in _IGNORED or value is None or value is False
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            self.declined = ", ".join(failed)
            return None
        cos, sin = cos_sin
        return (tuple(hidden.shape), hidden.dtype, hidden.requires_grad, tuple(cos.shape),
                cos.dtype, torch.is_autocast_enabled(), torch.get_autocast_dtype("cuda"))

    # ------------------------------------------------------------ capture
    def _capture(self, hidden, cos, sin, key) -> None:
        body = _Body(self.layers, self.forwards)
        sample = (hidden.detach().clone().requires_grad_(hidden.requires_grad),
                  cos.detach().clone(), sin.detach().clone())
        autocast = torch.is_autocast_enabled()
        with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=autocast,
                            cache_enabled=False):
            _warm_up(body, sample)
            # the warm-up's activations went back to the ordinary pool: return them to the
            # device before the graph's private pool allocates its own
            torch.cuda.empty_cache()
            self.graphed = torch.cuda.make_graphed_callables(body, sample, num_warmup_iters=0)
        self.key = key
        self.kept = [body, sample, own_gradients(body.parameters())]
        log.info("cuda graphs: captured %d decoder layers for %s tokens", len(self.layers),
                 "x".join(map(str, key[0][:-1])))

    # ------------------------------------------------------------ the patched forwards
    def enter(self, layer_forward, layer, hidden_states, attention_mask=None, **kwargs):
        """Layer k: run the whole body from the graph, or layer k eagerly."""
        key = None if self.failure else self._key(layer, hidden_states, attention_mask, kwargs)
        if key is not None and self.graphed is None:
            cos, sin = kwargs["position_embeddings"]
            try:
                self._capture(hidden_states, cos, sin, key)
            except Exception as error:  # noqa: BLE001 - any capture failure: stay eager
                self.failure = f"{type(error).__name__}: {error}"
                log.warning("cuda graphs: capture failed, decoder layers run eagerly (%s)",
                            self.failure)
                key = None
        if key is None or key != self.key:
            self.active = False
            self.eager_calls += 1
            return layer_forward(hidden_states, attention_mask=attention_mask, **kwargs)
        self.active = True
        self.replays += 1
        cos, sin = kwargs["position_embeddings"]
        return self.graphed(hidden_states, cos, sin)

    def follow(self, layer_forward, is_last, hidden_states, *args, **kwargs):
        """Layers k+1..N-1: the body already ran them when active."""
        if self.active:
            if is_last:
                self.active = False
            return hidden_states
        return layer_forward(hidden_states, *args, **kwargs)


def own_gradients(params) -> list:
    """Make every trainable parameter's gradient its own tensor: a hook that clones it.

    The graphed backward returns its gradients in static buffers that the next replay
    overwrites. Autograd would adopt such a buffer as param.grad when .grad is empty (the
    first micro-batch after zero_grad(set_to_none=True)) and then add later micro-batches
    into it in place: gradient accumulation would end with twice the last micro-batch's
    gradient instead of the sum. A clone per micro-batch (the adapter's size: 0.67 GB of
    copies for Mistral-7B r=64) keeps the sum right. Returns the hooks' handles.
    """
    return [p.register_hook(torch.Tensor.clone) for p in params if p.requires_grad]


def _warm_up(body, sample) -> None:
    """One eager forward + backward on a side stream (what make_graphed_callables' own warm-up
    does: kernels compiled and autotuned, libraries' lazy state created, outside capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = body(*sample)
        wrt = [t for t in (sample[0], *body.parameters()) if t.requires_grad]
        torch.autograd.grad(out, wrt, torch.zeros_like(out))
        del out
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()


def capture_layers(layers: list, first: int) -> GraphedBody | None:
    """Graph decoder layers[first:] (patching their forwards); None when there are none.

    The layers must not be checkpointed (their gradient_checkpointing is turned off here).
    """
    body_layers = list(layers[first:])
    if not body_layers:
        return None
    state = GraphedBody(body_layers, [layer.forward for layer in body_layers])
    for index, layer in enumerate(body_layers):
        layer.gradient_checkpointing = False
        lora_branch.set_dropout_mode(layer, "seeded")
        own = state.forwards[index]
        if index == 0:
            layer.forward = lambda hidden_states, *a, _own=own, _layer=layer, **k: \
                state.enter(_own, _layer, hidden_states, *a, **k)
        else:
            last = index == len(body_layers) - 1
            layer.forward = lambda hidden_states, *a, _own=own, _last=last, **k: \
                state.follow(_own, _last, hidden_states, *a, **k)
    return state
