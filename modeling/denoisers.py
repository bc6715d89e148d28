"""The denoisers of a generation: one interface over the ways a denoising pass can run.

A generation asks its denoiser for the logits of one block's window at every step:

    with make_denoiser(model, use_block_cache, attention_mask) as denoiser:
        for each block:
            denoiser.start_block(window)        # window: the positions whose logits the steps read
            logits = denoiser(sequences)        # (B, K, V), at every step that needs a pass
            denoiser.finish_block(sequences)    # the block's tokens are final

Kinds: `EagerDenoiser` (a plain forward pass), `GraphDenoiser` (the same pass replayed from a CUDA graph,
`cuda_graphs.GraphedDenoiser`), `BlockCacheDenoiser` (the approximate block cache of full-sequence models: the first
step of a block records what the rest of the sequence contributes, the later steps run on the window alone). A block
model's exact cache fits the same interface: `finish_block` is where the finished block's states are kept.
`make_denoiser` chooses the kind, in one place.
"""

import contextlib
from typing import Optional

import torch

from .cache import BlockContext
from .cuda_graphs import graphed_denoiser


class EagerDenoiser:
    """Plain forward passes over the whole sequence, computing the logits of the window only."""

    def __init__(self, model: torch.nn.Module, attention_mask: Optional[torch.Tensor]):
        self.model = model
        self.attention_mask = attention_mask  # (B, L), or None without padding
        self.window = self.positions = None

    def __enter__(self) -> "EagerDenoiser":
        return self

    def __exit__(self, *exc_info) -> None:
        return None

    def start_block(self, window: slice) -> None:
        self.window = window
        self.positions = torch.arange(window.start, window.stop, device=self.model.device)

    def __call__(self, sequences: torch.Tensor) -> torch.Tensor:
        """sequences (B, L) -> the logits (B, K, V) of the window's K positions."""
        return self.model(input_ids=sequences, attention_mask=self.attention_mask, logits_to_keep=self.positions,
                          return_dict=True).logits

    def finish_block(self, sequences: torch.Tensor) -> None:
        self.window = self.positions = None


class GraphDenoiser(EagerDenoiser):
    """The eager pass replayed from a CUDA graph captured for its shapes: the same logits, bit for bit, without the
    launch overhead of the ~1,000 kernels of each step (`cuda_graphs.GraphedDenoiser`)."""

    def __enter__(self) -> "GraphDenoiser":
        # Nothing runs between the steps of one generation that could move the parameters: the graphs check where
        # they lie once, not at every step (about 1 ms of host time a step for a 1.3B model).
        self._fixed = contextlib.ExitStack()
        self._fixed.enter_context(graphed_denoiser(self.model).parameters_fixed())
        return self

    def __exit__(self, *exc_info) -> None:
        self._fixed.close()

    def __call__(self, sequences: torch.Tensor) -> torch.Tensor:
        return graphed_denoiser(self.model)(sequences, self.attention_mask, self.positions)


class BlockCacheDenoiser(GraphDenoiser):
    """The approximate block cache (`use_block_cache`): a block's first pass runs over the whole sequence and records
    a `BlockContext` of its window; its later passes run on the window alone (from a CUDA graph with `graphs`).
    Approximate, as Fast-dLLM's dual cache: the recording does not see what the block commits after its first step."""

    def __init__(self, model: torch.nn.Module, attention_mask: Optional[torch.Tensor], graphs: bool):
        super().__init__(model, attention_mask)
        self.graphs = graphs
        self.context = None

    def __enter__(self) -> "BlockCacheDenoiser":
        return super().__enter__() if self.graphs else self

    def __exit__(self, *exc_info) -> None:
        if self.graphs:
            super().__exit__(*exc_info)

    def start_block(self, window: slice) -> None:
        super().start_block(window)
        self.context = BlockContext(window.start, window.stop)

    def __call__(self, sequences: torch.Tensor) -> torch.Tensor:
        if not self.context.recorded:
            return self.model(input_ids=sequences, attention_mask=self.attention_mask, block_context=self.context,
                              logits_to_keep=self.positions, return_dict=True).logits
        window_ids = sequences[:, self.window]
        if self.graphs:  # the graph's own tensor, overwritten by its next replay: copied
            return graphed_denoiser(self.model).window(window_ids, self.context).clone()
        return self.model(input_ids=window_ids, block_context=self.context, return_dict=True).logits

    def finish_block(self, sequences: torch.Tensor) -> None:
        super().finish_block(sequences)
        self.context = None


def make_denoiser(model: torch.nn.Module, use_block_cache: bool,
                  attention_mask: Optional[torch.Tensor]) -> EagerDenoiser:
    """The denoiser kind for `model`: the block cache when asked for (its window passes graphed on CUDA); else CUDA
    graphs on CUDA, unless the model is compiled (`model.compile()`: torch.compile then owns the passes, and its
    `mode="reduce-overhead"` its own graphs); else eager passes."""
    graphs = model.device.type == "cuda" and getattr(model, "_compiled_call_impl", None) is None
    if use_block_cache:
        return BlockCacheDenoiser(model, attention_mask, graphs)
    return GraphDenoiser(model, attention_mask) if graphs else EagerDenoiser(model, attention_mask)
