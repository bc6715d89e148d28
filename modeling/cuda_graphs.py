# Generated from src/diffuapriel_hf/cuda_graphs.py by `python -m diffuapriel_hf.hub bundle modeling`: do not edit.
# Hub remote code of DiffuApriel: loads with trust_remote_code=True where diffuapriel_hf is not installed.
"""Denoising forward passes replayed from CUDA graphs.

A diffusion sampler calls the denoiser many times on inputs of one shape. Launched eagerly, a 1.3B Mamba-2 stack
issues about 1,000 kernels per pass, and at a few thousand tokens the GPU waits on the Python that launches them.
`GraphedDenoiser` captures the pass once per input shape and replays it: the same kernels on the same inputs, so the
logits are the same as eager ones, bit for bit.

Only steps of at most `max_tokens` tokens (16K by default) are captured: launches matter below that, not above (on an
H200, a 1.3B Mamba-2 step at 8K tokens took 72 ms eagerly and 56 ms from a graph, at 16K 108 ms either way), where a
capture would only cost time and the memory of a second copy of the logits. Only unpadded inputs are captured: a
padded batch takes decisions on the host from its mask (in transformers' mask construction), which a capture cannot
wait for, so it runs eagerly. A graph reads the parameters where they were at
capture: it is dropped when any parameter moves (`.to()`, loading with `assign=True`) or the input shape changes, so
a model holds at most one graph (and its memory) at a time.
"""

import weakref
from typing import Optional

import torch

GRAPH_MAX_TOKENS = 16384  # the longest step (batch x length) captured by default


class GraphedDenoiser:
    """`denoiser(input_ids, attention_mask) -> logits (B, L, V)` for `model` (a `DiffuAprielForMaskedLM`), replayed
    from a CUDA graph captured for the input shape (after one eager warm-up pass, which also runs Triton's autotuning
    outside the capture); a call of another shape captures anew. Inputs that are not on CUDA, padded, of more than
    `max_tokens` tokens (batch x length), or seen while gradients are enabled, run eagerly. The returned logits are
    a fresh tensor, safe to keep across calls."""

    def __init__(self, model: torch.nn.Module, max_tokens: Optional[int] = GRAPH_MAX_TOKENS):
        self._model = weakref.ref(model)  # the denoiser is cached per model (`graphed_denoiser`): no cycle
        self.max_tokens = max_tokens  # None: capture every shape
        self.key = None
        self.graph = None  # (CUDAGraph, static input_ids, static logits)

    @property
    def model(self) -> torch.nn.Module:
        return self._model()

    def eager(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).logits

    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not input_ids.is_cuda or torch.is_grad_enabled() or self.model.training:
            return self.eager(input_ids, attention_mask)
        if self.max_tokens is not None and input_ids.numel() > self.max_tokens:
            return self.eager(input_ids, attention_mask)
        if attention_mask is not None and not bool(attention_mask.all()):
            return self.eager(input_ids, attention_mask)
        key = (tuple(input_ids.shape), input_ids.dtype, input_ids.device,
               tuple((p.data_ptr(), p.dtype) for p in self.model.parameters()))
        if key != self.key:
            self.key = self.graph = None  # free the old graph's memory before capturing the new one
            self.graph = self._capture(input_ids)
            self.key = key
        graph, static_input, static_logits = self.graph
        static_input.copy_(input_ids)
        graph.replay()
        return static_logits.clone()

    def _capture(self, input_ids: torch.Tensor):
        static_input = input_ids.clone()
        # The warm-up runs on a side stream, as capture requires, so that lazy initialisation (cuBLAS workspaces,
        # Triton autotuning) happens before it.
        side = torch.cuda.Stream(device=input_ids.device)
        side.wait_stream(torch.cuda.current_stream(input_ids.device))
        with torch.cuda.stream(side):
            self.eager(static_input, None)
        torch.cuda.current_stream(input_ids.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = self.eager(static_input, None)
        return graph, static_input, static_logits


_denoisers: "weakref.WeakKeyDictionary[torch.nn.Module, GraphedDenoiser]" = weakref.WeakKeyDictionary()


def graphed_denoiser(model: torch.nn.Module) -> GraphedDenoiser:
    """The `GraphedDenoiser` of `model`, kept for as long as the model lives so that repeated `generate()` calls of
    one shape reuse its graph."""
    if model not in _denoisers:
        _denoisers[model] = GraphedDenoiser(model)
    return _denoisers[model]


def release_graphs(model: torch.nn.Module) -> None:
    """Drop `model`'s cached graph now, and the GPU memory it holds."""
    _denoisers.pop(model, None)
