"""Denoising forward passes replayed from CUDA graphs.

A diffusion sampler calls the denoiser many times on inputs of one shape. Launched eagerly, a 1.3B Mamba-2 stack
issues about 1,000 kernels per pass, and at a few thousand tokens the GPU waits on the Python that launches them.
`GraphedDenoiser` captures the pass once per input shape and replays it: the same kernels on the same inputs, so the
logits are the same as eager ones, bit for bit.

Only steps of at most `max_tokens` tokens (by default `kernel_policy.DISPATCH_THRESHOLDS["graph_max_tokens"]`, 16K,
with its measurements) are captured: launches matter below that, not above, where a capture would only cost time and
the memory of a second copy of the logits. Only unpadded inputs are captured: a
padded batch takes decisions on the host from its mask (in transformers' mask construction), which a capture cannot
wait for, so it runs eagerly. A graph reads the parameters where they were at
capture: it is dropped when any parameter moves (`.to()`, loading with `assign=True`) or the input shape changes, so
a model holds at most one graph (and its memory) at a time.

With the block cache (`use_block_cache`), the passes over a block's window alone repeat with one shape and read what
the block's first (whole-sequence) pass recorded: `GraphedDenoiser.window` captures them once, and for each later
block copies its recording into the tensors that graph reads.

A block diffusion model's steps against its exact cache (`cache.BlockDiffusionCache`) have one shape for every block
of a generation and read the cache's tensors, which the eager passes that consume blocks update in place:
`GraphedDenoiser.cached_step` captures the step once per cache, and `block_diffusion_cache` keeps that cache for the
next generation of the same shapes, emptied, so that its graph is replayed again. The pass that consumes a committed
block into the cache has one shape too, and writes where the cache's device-side length says: `cached_consume`
replays it from a second graph.
"""

import contextlib
import weakref
from typing import Optional

import torch

from .cache import BlockDiffusionCache
from .kernel_policy import DISPATCH_THRESHOLDS

__all__ = ["GRAPH_MAX_TOKENS", "GraphedDenoiser", "graphed_denoiser", "release_graphs"]

GRAPH_MAX_TOKENS = DISPATCH_THRESHOLDS["graph_max_tokens"].value  # the longest step (batch x length) captured by default


class GraphedDenoiser:
    """`denoiser(input_ids, attention_mask, logits_to_keep) -> logits (B, L or K, V)` for `model` (a
    `DiffuAprielForMaskedLM`; `logits_to_keep` None for every position or a 1-D tensor of K positions), replayed from a
    CUDA graph captured for the input shapes (after one eager warm-up pass, which also runs Triton's autotuning outside
    the capture); a call of other shapes captures anew, and other positions of the same number replay the same graph.
    Inputs that are not on CUDA, padded, of more than `max_tokens` tokens (batch x length), or seen while gradients
    are enabled, run eagerly. The returned logits are a fresh tensor, safe to keep across calls. `window` does the same
    for the block cache's window passes."""

    def __init__(self, model: torch.nn.Module, max_tokens: Optional[int] = GRAPH_MAX_TOKENS):
        self._model = weakref.ref(model)  # the denoiser is cached per model (`graphed_denoiser`): no cycle
        self.max_tokens = max_tokens  # None: capture every shape
        self.key = None
        self.graph = None  # (CUDAGraph, static inputs, static logits)
        self._static_context = None  # the BlockContext that the window graph reads, with `window`
        self._recording_of = None  # a weak reference to the context whose recording `_static_context` holds
        self._fixed_parameters_key = None  # set within `parameters_fixed`
        self._block_cache = None  # the BlockDiffusionCache that `cached_step`'s graph reads
        self._block_cache_layout = None
        self._consume = None  # (key, CUDAGraph, static inputs) of `cached_consume`
        self._consume_warmed = None  # the key whose pass ran eagerly once, before its capture

    @property
    def model(self) -> torch.nn.Module:
        return self._model()

    def eager(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
              logits_to_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        keep = 0 if logits_to_keep is None else logits_to_keep
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, return_dict=True)
        return output.logits

    def eager_window(self, window_ids: torch.Tensor, context) -> torch.Tensor:
        """The window pass that `window` replays, run eagerly."""
        return self.model(input_ids=window_ids, block_context=context, return_dict=True).logits

    def _runs_eagerly(self, input_ids: torch.Tensor) -> bool:
        return (not input_ids.is_cuda or torch.is_grad_enabled() or self.model.training
                or (self.max_tokens is not None and input_ids.numel() > self.max_tokens))

    def _parameters_key(self) -> tuple:
        if self._fixed_parameters_key is not None:
            return self._fixed_parameters_key
        return tuple((p.data_ptr(), p.dtype) for p in self.model.parameters())

    @contextlib.contextmanager
    def parameters_fixed(self):
        """Within: the parameters are taken to stay where they are, so where they lie is read once, on entry, instead
        of at every call (walking the model's modules costs about 1 ms of host time for a 1.3B model)."""
        if self._fixed_parameters_key is not None:  # within already
            yield self
            return
        self._fixed_parameters_key = self._parameters_key()
        try:
            yield self
        finally:
            self._fixed_parameters_key = None

    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 logits_to_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self._runs_eagerly(input_ids) or (attention_mask is not None and not bool(attention_mask.all())):
            return self.eager(input_ids, attention_mask, logits_to_keep)
        inputs = (input_ids,) if logits_to_keep is None else (input_ids, logits_to_keep.to(input_ids.device))
        key = (tuple((t.shape, t.dtype) for t in inputs), input_ids.device, self._parameters_key())
        if key != self.key:
            self._drop_graph()  # before capturing: the old graph's memory is freed first
            static_inputs = tuple(t.clone() for t in inputs)
            graph, static_logits = self._capture(lambda: self.eager(static_inputs[0], None, *static_inputs[1:]),
                                                 input_ids.device)
            self.graph, self.key = (graph, static_inputs, static_logits), key
        return self._replay(*inputs).clone()

    def window(self, window_ids: torch.Tensor, context) -> torch.Tensor:
        """`model(input_ids=window_ids, block_context=context).logits` (B, end - start, V) for a recorded
        `BlockContext`, replayed from a CUDA graph. The graph reads a private copy of the first context it was captured
        for; a later context of the same shapes (the next block's, wherever its window lies) is copied into it, once (a
        recording does not change after it is made), and the graph replayed. Passes the `__call__` rules send to
        eager, and contexts with padding, run eagerly. The logits are the graph's own tensor, overwritten by the next
        replay: copy what must be kept."""
        if self._runs_eagerly(window_ids) or context.padding_mask is not None:
            return self.eager_window(window_ids, context)
        recorded = context.recorded_tensors()
        layout = (context.batch_size, context.length, context.end - context.start, tuple(sorted(context.mamba_states)),
                  tuple(sorted(context.keys_values)), tuple((t.shape, t.dtype, t.device) for t in recorded))
        key = (tuple(window_ids.shape), window_ids.dtype, window_ids.device, self._parameters_key(), layout)
        if key != self.key:
            self._drop_graph()
            static_input, static_context = window_ids.clone(), context.clone()
            graph, static_logits = self._capture(lambda: self.eager_window(static_input, static_context),
                                                 static_input.device)
            self.graph, self.key, self._static_context = (graph, (static_input,), static_logits), key, static_context
            self._recording_of = weakref.ref(context)
        if self._recording_of() is not context:
            for static, given in zip(self._static_context.recorded_tensors(), recorded):
                static.copy_(given)
            self._recording_of = weakref.ref(context)
        return self._replay(window_ids)

    def block_diffusion_cache(self, batch_size: int, max_length: int) -> BlockDiffusionCache:
        """An empty `BlockDiffusionCache` for the model's generation of `batch_size` rows on a canvas of `max_length`
        columns: the one kept from the last generation of these shapes (its step graph still valid), else a new one."""
        model = self.model
        layout = (batch_size, max_length, model.dtype, model.device)
        if self._block_cache is not None and self._block_cache_layout == layout:
            self._block_cache.reset()
            return self._block_cache
        self._drop_graph()
        self._block_cache = BlockDiffusionCache(model.config, batch_size, max_length, model.device, model.dtype)
        self._block_cache_layout = layout
        return self._block_cache

    def cached_step(self, input_ids: torch.Tensor, padding_mask: Optional[torch.Tensor],
                    cache: BlockDiffusionCache) -> torch.Tensor:
        """`model(input_ids=input_ids, attention_mask=padding_mask, past_key_values=cache).logits` (B, W, V), a step
        that reads the cache without consuming, replayed from a CUDA graph captured for the cache (the steps of every
        block have the shapes of the first; the cache's tensors are updated in place between them). Passes the
        `__call__` rules send to eager run eagerly. padding_mask: (B, W) bool, or None without padding (a pass of
        its own: the model then skips the padding path). A fresh tensor, safe to keep."""
        if self._runs_eagerly(input_ids):
            return self.model(input_ids=input_ids, attention_mask=padding_mask, past_key_values=cache).logits
        key = (tuple(input_ids.shape), input_ids.device, self._parameters_key(), id(cache), padding_mask is None)
        if key != self.key:
            self._drop_graph()
            static_inputs = (input_ids.clone(), _clone(padding_mask))
            graph, static_logits = self._capture(
                lambda: self.model(input_ids=static_inputs[0], attention_mask=static_inputs[1],
                                   past_key_values=cache).logits, input_ids.device)
            self.graph, self.key = (graph, static_inputs, static_logits), key
        return self._replay(input_ids, padding_mask).clone()

    def cached_consume(self, input_ids: torch.Tensor, padding_mask: Optional[torch.Tensor],
                       cache: BlockDiffusionCache) -> None:
        """`model(input_ids=input_ids, attention_mask=padding_mask, past_key_values=cache, use_cache=True)`: consume
        one committed block into the cache, replayed from a CUDA graph of the pass (its keys read whole, as a step
        reads them: `cache.static_reads`). The first such pass of a cache runs eagerly, so that what a capture cannot
        do (autotuning, workspaces) is done; the second is captured without running (so the cache's host-side length
        is put back after it) and replayed; later ones are replayed."""
        cache.static_reads = True
        try:
            if self._runs_eagerly(input_ids):
                self.model(input_ids=input_ids, attention_mask=padding_mask, past_key_values=cache, use_cache=True,
                           logits_to_keep=1)
                return
            key = (tuple(input_ids.shape), input_ids.device, self._parameters_key(), id(cache), padding_mask is None)
            if self._consume is None or self._consume[0] != key:
                if self._consume_warmed != key:
                    self.model(input_ids=input_ids, attention_mask=padding_mask, past_key_values=cache,
                               use_cache=True, logits_to_keep=1)
                    self._consume_warmed = key
                    return
                self._consume = (key, *self._capture_consume(input_ids, padding_mask, cache))
            _, graph, static_inputs = self._consume
            _copy_into(static_inputs, (input_ids, padding_mask))
            graph.replay()
            cache.length += input_ids.shape[1]  # the replay moved the device side of the cache
        finally:
            cache.static_reads = False

    def _capture_consume(self, input_ids, padding_mask, cache):
        static_inputs = (input_ids.clone(), _clone(padding_mask))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.model(input_ids=static_inputs[0], attention_mask=static_inputs[1], past_key_values=cache,
                       use_cache=True, logits_to_keep=1)
        cache.length -= input_ids.shape[1]  # recorded, not run: only the host side moved
        return graph, static_inputs

    def _drop_graph(self):
        self._consume = self._consume_warmed = None
        self.key = self.graph = self._static_context = self._recording_of = None

    def _replay(self, *inputs: torch.Tensor) -> torch.Tensor:
        graph, static_inputs, static_logits = self.graph
        _copy_into(static_inputs, inputs)
        graph.replay()
        return static_logits

    @staticmethod
    def _capture(run, device: torch.device):
        """A CUDA graph of `run()` and the tensor it returns, after one eager warm-up run on a side stream (as capture
        requires), so that lazy initialisation (cuBLAS workspaces, Triton autotuning) happens before it."""
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = run()
        return graph, output


def _clone(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.clone()


def _copy_into(static_inputs: tuple, inputs: tuple) -> None:
    """A replay's inputs copied into the tensors its graph reads (None where the graph was captured without one)."""
    for static, given in zip(static_inputs, inputs):
        if static is not None:
            static.copy_(given)


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
