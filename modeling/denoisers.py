"""The denoisers of a generation: one interface over the ways a denoising pass can run.

A generation asks its denoiser for the logits of one block's window at every step:

    with make_denoiser(model, use_block_cache, attention_mask) as denoiser:
        for each block:
            denoiser.start_block(window)        # window: the positions whose logits the steps read
            logits = denoiser(sequences)        # (B, K, V), at every step that needs a pass
            denoiser.finish_block(sequences)    # the block's tokens are final

Kinds: `EagerDenoiser` (a plain forward pass), `GraphDenoiser` (the same pass replayed from a CUDA graph,
`cuda_graphs.GraphedDenoiser`), `BlockCacheDenoiser` (the approximate block cache of full-sequence models: the first
step of a block records what the rest of the sequence contributes, the later steps run on the window alone) and
`ExactCacheDenoiser` (a block diffusion model's exact cache: the steps run on the block alone, `finish_block` moves
the cache past it). `make_denoiser` chooses the kind, in one place.
"""

import contextlib
from typing import Optional

import torch

from .cache import BlockContext, BlockDiffusionCache
from .cuda_graphs import graphed_denoiser

__all__ = ["BlockCacheDenoiser", "EagerDenoiser", "ExactCacheDenoiser", "GraphDenoiser", "make_denoiser"]


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


# The most tokens (per row) a pass consuming a prompt into the exact cache takes at once.
PREFILL_CHUNK = 4096


class ExactCacheDenoiser:
    """A block diffusion model's exact cache (`cache.BlockDiffusionCache`): the blocks before the current one are
    consumed once (the prompt's in one prefill pass at the first step, each generated block by `finish_block`), and
    every step runs the current block alone against the cache (with `graphs`, from a CUDA graph, the same for every
    block, and so are the passes that consume the committed blocks). The canvas's blocks are the model's (`plan_block_generation`); the logits are those of the window
    asked for, which ends where its block ends."""

    def __init__(self, model: torch.nn.Module, attention_mask: Optional[torch.Tensor], graphs: bool):
        self.model, self.graphs, self.block_size = model, graphs, model.config.block_size
        self.attention_mask = attention_mask  # (B, L) of the canvas, or None without padding
        self.cache = self.block = self.window = None

    def __enter__(self) -> "ExactCacheDenoiser":
        return self

    def __exit__(self, *exc_info) -> None:
        self.cache = None

    def start_block(self, window: slice) -> None:
        start = window.start - window.start % self.block_size
        self.block, self.window = slice(start, start + self.block_size), window

    def padding(self, columns: slice) -> Optional[torch.Tensor]:
        """The padding of the canvas's `columns`, or None without padding: the model's Mamba layers then skip their
        padding path (a step of 32 tokens is bound by its launches, and that path adds about ten a layer)."""
        return None if self.attention_mask is None else self.attention_mask[:, columns].bool()

    def consume(self, sequences: torch.Tensor, end: int) -> None:
        """Move the cache past the canvas's tokens up to column `end` (whole blocks), in passes of at most
        PREFILL_CHUNK tokens: a long prompt's activations and attention masks then take the memory of a chunk, not of
        the prompt."""
        if self.cache is None:
            self.cache = self.new_cache(sequences)
        chunk = max(PREFILL_CHUNK // self.block_size, 1) * self.block_size
        while self.cache.length < end:
            columns = slice(self.cache.length, min(self.cache.length + chunk, end))
            self.model(input_ids=sequences[:, columns], attention_mask=self.padding(columns),
                       past_key_values=self.cache, use_cache=True, logits_to_keep=1)

    def new_cache(self, sequences: torch.Tensor) -> BlockDiffusionCache:
        batch, width = sequences.shape
        if self.graphs:
            return graphed_denoiser(self.model).block_diffusion_cache(batch, width)
        return BlockDiffusionCache(self.model.config, batch, width, sequences.device, self.model.dtype)

    def __call__(self, sequences: torch.Tensor) -> torch.Tensor:
        """sequences (B, L) -> the logits (B, K, V) of the window's K positions, from a pass over its block alone."""
        self.consume(sequences, self.block.start)
        ids, padding = sequences[:, self.block], self.padding(self.block)
        if self.graphs:
            logits = graphed_denoiser(self.model).cached_step(ids, padding, self.cache)
        else:
            logits = self.model(input_ids=ids, attention_mask=padding, past_key_values=self.cache).logits
        return logits[:, self.window.start - self.block.start :]

    def finish_block(self, sequences: torch.Tensor) -> None:
        """The committed block moves the cache past it (on CUDA from a graph of the pass)."""
        if self.graphs and self.cache is not None and self.cache.length == self.block.start:
            graphed_denoiser(self.model).cached_consume(sequences[:, self.block], self.padding(self.block),
                                                        self.cache)
        self.consume(sequences, self.block.stop)  # (nothing left to consume after the graph's pass)
        self.block = self.window = None


def make_denoiser(model: torch.nn.Module, use_block_cache: bool, use_cache: bool,
                  attention_mask: Optional[torch.Tensor]) -> EagerDenoiser:
    """The denoiser kind for `model`: a block diffusion model's exact cache unless `use_cache` is False (then whole-
    sequence passes); the block cache when asked for (its window passes graphed on CUDA); else CUDA graphs on CUDA,
    unless the model is compiled (`model.compile()`: torch.compile then owns the passes, and its
    `mode="reduce-overhead"` its own graphs); else eager passes."""
    graphs = model.device.type == "cuda" and getattr(model, "_compiled_call_impl", None) is None
    if model.config.block_size is not None and use_cache:
        return ExactCacheDenoiser(model, attention_mask, graphs)
    if use_block_cache:
        return BlockCacheDenoiser(model, attention_mask, graphs)
    return GraphDenoiser(model, attention_mask) if graphs else EagerDenoiser(model, attention_mask)
