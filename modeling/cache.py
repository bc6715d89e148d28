"""The block cache: what the tokens outside a window of a sequence contribute to each layer, recorded by one pass over
the whole sequence and read by passes over the window alone (Fast-dLLM's dual cache; benchmarks/block_cache.py
measures what it saves and what it changes).

`BlockContext` follows transformers' cache layers (`transformers.cache_utils`): the attention layers hand it their
keys and values through `update(key_states, value_states, layer_idx)` and attend to what it returns; the Mamba layers
store and read the state each direction enters the window with through `update_mamba_states` / `mamba_state`, as
transformers' Mamba caches hold a layer's convolution and SSM states. The model calls `check_pass` and
`record_sequence` once a pass, the generation code and the CUDA graphs read `recorded_tensors` and `clone`.
"""

import copy
from typing import Optional

import torch


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


__all__ = ["BlockContext"]
