"""The caches of generation.

`BlockContext`, the approximate block cache of full-sequence models: what the tokens outside a window of a sequence
contribute to each layer, recorded by one pass over the whole sequence and read by passes over the window alone
(Fast-dLLM's dual cache; benchmarks/block_cache.py measures what it saves and what it changes).

`BlockDiffusionCache`, the exact cache of block diffusion models (`config.block_size`): what the finished blocks of a
sequence hand the next one, at every layer (the left-to-right Mamba state, the attention keys and values), so that a
denoising step runs on the current block alone and gives the logits of a pass over the whole sequence.

`BlockContext` follows transformers' cache layers (`transformers.cache_utils`): the attention layers hand it their
keys and values through `update(key_states, value_states, layer_idx)` and attend to what it returns; the Mamba layers
store and read the state each direction enters the window with through `update_mamba_states` / `mamba_state`, as
transformers' Mamba caches hold a layer's convolution and SSM states. The model calls `check_pass` and
`record_sequence` once a pass, the generation code and the CUDA graphs read `recorded_tensors` and `clone`.
"""

import copy
from typing import Optional

import torch

from .cache_attention import visible_keys
from .configuration_diffuapriel import MAMBA


class BlockContext:
    """What the tokens outside a window [start, end) of a sequence contribute to each layer, so that denoising steps
    that change only the window's tokens can run on the window alone.

    A forward pass over the whole sequence given `block_context=BlockContext(start, end)` records, at every layer,
    the state the left-to-right Mamba direction enters the window with (at `start`), the state the right-to-left one
    enters it with (at `end`), and the attention keys and values of the outside positions; and the padding of the
    whole sequence and the window's positions. Passes given the recorded context then take the window's tokens alone,
    (B, end - start), at a cost that grows with the window, not with the sequence. Their attention reads the outside
    keys first and the window's after them (attention without a causal mask does not depend on the keys' order), so
    that without padding nothing a window pass does depends on where the window lies, only on the recorded tensors
    (`recorded_tensors`): one CUDA graph serves every window of a shape (`cuda_graphs.GraphedDenoiser.window`).

    The first window pass after recording gives the whole pass's logits; once the window's tokens change, it is an
    approximation: the outside positions' hidden states depend on the window through every bidirectional layer
    below, and they are kept as recorded.
    """

    def __init__(self, start: int, end: int):
        if isinstance(start, bool) or isinstance(end, bool) or not (isinstance(start, int) and isinstance(end, int)):
            raise TypeError(f"BlockContext needs integer start and end, got {start!r} and {end!r}")
        if not 0 <= start < end:
            raise ValueError(f"BlockContext needs 0 <= start < end, got start={start}, end={end}")
        self.start, self.end = start, end
        self.recorded = False
        self.batch_size = self.length = None  # of the whole sequence
        self.padding_mask = None  # (B, length) bool, True at real tokens; None without padding
        self.window_position_ids = None  # (B, end - start), with attention layers
        self.mamba_states = {}  # layer index -> one (conv, SSM) state per direction, as Mamba2Mixer.forward's
        self.keys_values = {}  # layer index -> (key, value) of the outside positions, (B, Hkv, length - window, d)

    # ------------------------------------------------------------------------------------------------------------------
    # A pass: checked, then recorded (whole sequence) or read (window).

    def check_pass(self, batch: int, seqlen: int, attention_mask: Optional[torch.Tensor]) -> None:
        """Refuse a pass whose inputs do not fit this context: the whole sequence while recording, the window's tokens
        alone, with the recorded padding, once recorded."""
        if not self.recorded:
            if self.end > seqlen:
                raise ValueError(
                    f"the BlockContext's window [{self.start}, {self.end}) does not fit a sequence of {seqlen} tokens"
                )
            return
        window = self.end - self.start
        if (batch, seqlen) != (self.batch_size, window):
            raise ValueError(
                f"a pass with a recorded BlockContext takes the window's tokens alone, (batch, end - start) = "
                f"({self.batch_size}, {window}), got ({batch}, {seqlen})"
            )
        if attention_mask is not None:
            raise ValueError("a pass with a recorded BlockContext uses the recorded padding: pass attention_mask=None")

    def record_sequence(self, batch: int, seqlen: int, padding_mask: Optional[torch.Tensor],
                        position_ids: Optional[torch.Tensor]) -> None:
        """At the start of the recording pass: the whole sequence's shape, padding (B, L) bool or None, and the
        window's positions out of position_ids (B, L) (None without attention layers)."""
        self.batch_size, self.length = batch, seqlen
        self.padding_mask = padding_mask
        if position_ids is not None:
            self.window_position_ids = position_ids[:, self.start : self.end].clone()

    def window_padding_mask(self) -> Optional[torch.Tensor]:
        """The recorded padding (B, end - start) of the window's positions, or None without padding."""
        return None if self.padding_mask is None else self.padding_mask[:, self.start : self.end]

    def key_padding_mask(self) -> Optional[torch.Tensor]:
        """The padding of the keys a window pass attends to, in their order (outside positions, then the window), or
        None without padding."""
        if self.padding_mask is None:
            return None
        whole = self.padding_mask
        return torch.cat([whole[:, : self.start], whole[:, self.end :], whole[:, self.start : self.end]], dim=1)

    def mark_recorded(self) -> None:
        """At the end of the recording pass: later passes read the context."""
        self.recorded = True

    # ------------------------------------------------------------------------------------------------------------------
    # Per layer, as transformers' cache layers.

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values (B, Hkv, ., d) that the queries of the pass attend to (transformers' `Cache.update`).
        Recording: the whole sequence's, as given, keeping the outside positions'. Recorded: the outside positions'
        first, then the window's given ones."""
        if not self.recorded:
            self.keys_values[layer_idx] = tuple(
                torch.cat([t[:, :, : self.start], t[:, :, self.end :]], dim=2) for t in (key_states, value_states)
            )
            return key_states, value_states
        outside_key, outside_value = self.keys_values[layer_idx]
        return torch.cat([outside_key, key_states], dim=2), torch.cat([outside_value, value_states], dim=2)

    def entry_position(self, direction: int, seqlen: int) -> int:
        """Where direction 0 (left to right) or 1 (right to left, reading the reversed sequence) enters the window, in
        its own reading order of a sequence of `seqlen` tokens."""
        return self.start if direction == 0 else seqlen - self.end

    def update_mamba_states(self, layer_idx: int, states: tuple) -> None:
        """Keep the states (one (conv inputs, SSM state) per direction) a Mamba layer's directions enter the window
        with, from the recording pass."""
        self.mamba_states[layer_idx] = tuple(states)

    def mamba_state(self, layer_idx: int, direction: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The recorded (conv inputs, SSM state) that `direction` of layer `layer_idx` continues from in a window pass."""
        return self.mamba_states[layer_idx][direction]

    # ------------------------------------------------------------------------------------------------------------------

    def clone(self) -> "BlockContext":
        """A copy of this context with copies of its recorded tensors."""
        twin = copy.copy(self)
        twin.mamba_states = {layer: tuple(tuple(t.clone() for t in state) for state in states)
                             for layer, states in self.mamba_states.items()}
        twin.keys_values = {layer: tuple(t.clone() for t in pair) for layer, pair in self.keys_values.items()}
        if self.window_position_ids is not None:
            twin.window_position_ids = self.window_position_ids.clone()
        return twin

    def recorded_tensors(self) -> list[torch.Tensor]:
        """Every tensor that a window pass reads from the context, but the padding mask, in a fixed order."""
        tensors = [t for layer in sorted(self.mamba_states) for state in self.mamba_states[layer] for t in state]
        tensors += [t for layer in sorted(self.keys_values) for t in self.keys_values[layer]]
        return tensors + ([] if self.window_position_ids is None else [self.window_position_ids])


class BlockDiffusionCache:
    """The exact cache of a block diffusion model (`config.block_size`): at every layer, what the blocks consumed so
    far hand the blocks after them. In a block model a block reads the blocks before it only through the
    left-to-right Mamba scan (its state and the convolution's last inputs at the block's start) and the attention
    keys and values of earlier positions (the right-to-left scan restarts in every block): with those, a pass over
    one block gives the logits that a pass over the whole sequence gives there, and a Mamba layer's share of the
    cache has the same size whatever the context.

    A pass of the model given `past_key_values=cache` takes the tokens that follow the consumed ones, whole blocks
    (B, W) with W a multiple of the block size, and its `attention_mask` (B, W) (padding only as whole blocks before a
    row's first token, or at a row's end). With `use_cache=True` the pass consumes them: each layer's state moves past
    them and their keys and values are kept (a prompt's prefill; a block once committed). Without, the pass reads the
    cache and leaves what later passes read as it was (a denoising step): such passes always read the same tensors,
    updated in place, so one CUDA graph serves every step of every block (`cuda_graphs.GraphedDenoiser.cached_step`).

    Layers use it as transformers' cache layers: attention layers call `update(key, value, layer_idx)` and attend to
    what it returns under `attention_mask()` (or, as the model's `KernelPolicy` chooses on CUDA, through
    `cache_attention.cache_attention`, which reads the same rule from `key_valid` and `length_tensor`); Mamba layers
    read `mamba_state(layer_idx)` and hand their new state to `update_mamba_state`. Keys and values are held in buffers
    of `max_length` positions. Every pass writes its own at their positions, after the consumed ones (at
    `length_tensor`, a device tensor, so that a graph writes where the cache stands when it is replayed), marks which
    of them are real in `key_valid`, and attends to the buffer itself, a view: nothing is copied but the pass's own
    keys and values. A step's are overwritten by the next pass; a consuming pass's stay. A step reads the buffer whole
    under a mask, so that the shapes of the steps never change; a consuming pass reads up to its own last position,
    or, with `static_reads` (a consuming pass replayed from a graph), the whole buffer as a step does.
    """

    def __init__(self, config, batch_size: int, max_length: int, device=None, dtype: torch.dtype = torch.float32):
        if config.block_size is None:
            raise ValueError("BlockDiffusionCache is the cache of a block diffusion model: config.block_size is None")
        if max_length < 1 or max_length % config.block_size:
            raise ValueError(f"max_length ({max_length}) must be a positive multiple of the block size "
                             f"({config.block_size})")
        self.block_size, self.max_length = config.block_size, max_length
        self.length = 0  # positions consumed, the same for every row: whole blocks
        self.length_tensor = torch.zeros((), dtype=torch.long, device=device)  # the same, on the device
        self.static_reads = False
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) real tokens consumed
        # True at the real tokens' keys: the kept ones, and each pass's own from its start (`cache_attention`'s rule)
        self.key_valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self.mamba_states, self.keys_values = {}, {}
        conv_dim = config.mamba_intermediate_size + 2 * config.mamba_n_groups * config.mamba_d_state
        for layer_idx, layer_type in enumerate(config.layer_types):
            if layer_type == MAMBA:  # (conv inputs (B, d_conv - 1, C), SSM state (B, H, P, N) float32)
                self.mamba_states[layer_idx] = (
                    torch.zeros(batch_size, config.mamba_d_conv - 1, conv_dim, device=device, dtype=dtype),
                    torch.zeros(batch_size, config.mamba_n_heads, config.mamba_d_head, config.mamba_d_state,
                                device=device, dtype=torch.float32),
                )
            else:  # (B, Hkv, max_length, d)
                shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
                self.keys_values[layer_idx] = tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in "kv")
        self.consuming = False
        self.pass_mask = self.pass_positions = None
        self.visible = max_length  # the buffer positions a pass reads: the kept keys and its own

    # ------------------------------------------------------------------------------------------------------------------
    # A pass: begun by the model with its padding, ended once every layer ran.

    def begin_pass(self, padding_mask: torch.Tensor, consume: bool) -> None:
        """padding_mask: (B, W) bool, True at real tokens, of the pass's W tokens (whole blocks)."""
        batch, width = padding_mask.shape
        if batch != self.positions.shape[0] or width % self.block_size:
            raise ValueError(f"a pass with a BlockDiffusionCache of batch {self.positions.shape[0]} takes whole blocks "
                             f"of {self.block_size} tokens, got inputs of shape ({batch}, {width})")
        if self.length + width > self.max_length:  # the pass's keys and values are written at their positions
            raise ValueError(f"the BlockDiffusionCache holds {self.max_length} positions: {self.length} are consumed, "
                             f"{width} more do not fit")
        self.consuming, self.pass_mask = consume, padding_mask
        self.visible = self.length + width if consume and not self.static_reads else self.max_length
        self.write_index = self.length_tensor + torch.arange(width, device=padding_mask.device)
        self.key_valid.index_copy_(1, self.write_index, padding_mask)
        # Positions count real tokens only, as in a pass over the whole sequence.
        self.pass_positions = (self.positions[:, None] + padding_mask.long().cumsum(-1) - 1).clamp(min=0)

    def end_pass(self) -> None:
        if self.consuming:
            width = self.pass_mask.shape[1]
            self.positions += self.pass_mask.sum(-1)
            self.length_tensor += width
            self.length += width
        self.consuming, self.pass_mask, self.pass_positions, self.write_index = False, None, None, None

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, W, V) for the V buffer positions the pass reads (`update`), additive (0 or the dtype's minimum, as
        every attention implementation takes it): `cache_attention.visible_keys`, the kept keys and, among the pass's
        own (written after them), the real ones of its block and the blocks before it."""
        allowed = visible_keys(self.key_valid[:, : self.visible], self.length_tensor, self.pass_mask.shape[1],
                               self.block_size)
        return torch.zeros(allowed[:, None].shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed[:, None], torch.finfo(dtype).min)

    # ------------------------------------------------------------------------------------------------------------------
    # Per layer, as transformers' cache layers.

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values (B, Hkv, V, d) the pass's queries attend to: the buffer's first V positions (a step:
        all of them), views, once the pass's own (B, Hkv, W, d) are written after the consumed ones."""
        kept_keys, kept_values = self.keys_values[layer_idx]
        kept_keys.index_copy_(2, self.write_index, key_states)
        kept_values.index_copy_(2, self.write_index, value_states)
        return kept_keys[:, :, : self.visible], kept_values[:, :, : self.visible]

    def mamba_state(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (conv inputs, SSM state) the left-to-right direction of Mamba layer `layer_idx` continues from."""
        return self.mamba_states[layer_idx]

    def update_mamba_state(self, layer_idx: int, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        """A consuming pass's new state, copied into the tensors the next passes read."""
        for kept, new in zip(self.mamba_states[layer_idx], state):
            kept.copy_(new)

    def reset(self) -> None:
        """Empty, as built: for a new generation of the same shapes (its tensors stay where they are)."""
        self.length = 0
        for tensor in [self.length_tensor, self.positions, self.key_valid, *self.tensors()]:
            tensor.zero_()

    def tensors(self) -> list[torch.Tensor]:
        """The state tensors, in a fixed order."""
        return [t for layer in sorted(self.mamba_states) for t in self.mamba_states[layer]] + [
            t for layer in sorted(self.keys_values) for t in self.keys_values[layer]]


__all__ = ["BlockContext", "BlockDiffusionCache"]
