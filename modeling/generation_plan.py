"""The plan of a diffusion generation, decided before any forward pass: which standard generation options apply,
how many new tokens, in which blocks, with how many denoising steps each. Pure functions of the settings and the
prompt's shape: tested without a model."""

import math
from dataclasses import dataclass
from typing import Optional

from transformers import GenerationConfig

__all__ = [
    "HONOURED_OPTIONS",
    "GenerationPlan",
    "check_sampling_values",
    "check_token_ids",
    "plan_block_generation",
    "plan_generation",
    "refused_options",
]

# GenerationConfig's fields that diffusion sampling honours (the rest are refused by name when set): lengths, the
# sampling options, applied through transformers' logits processors, special tokens, stopping, the output.
HONOURED_OPTIONS = frozenset({
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "max_time", "stop_strings", "do_sample",
    "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "repetition_penalty",
    "no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "return_dict_in_generate", "pad_token_id",
    "bos_token_id", "eos_token_id",
    # A block diffusion model's exact cache (True, the default) or whole-sequence passes at every step (False); a
    # full-sequence model keeps no exact cache (its approximate one is `use_block_cache`), so it changes nothing there.
    "use_cache",
    # Bookkeeping, not options.
    "transformers_version", "_from_model_config",
})
# Values of refused options that ask for nothing (transformers' own defaults in some versions).
NEUTRAL_VALUES = {
    "num_beams": 1, "num_beam_groups": 1, "diversity_penalty": 0.0, "length_penalty": 1.0, "early_stopping": False,
    "output_attentions": False, "output_hidden_states": False, "output_scores": False, "output_logits": False,
    "renormalize_logits": False, "remove_invalid_values": False, "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0, "guidance_scale": 1.0, "token_healing": False, "is_assistant": False,
    "low_memory": False, "disable_compile": False, "return_legacy_cache": True,
}


def refused_options(config: GenerationConfig) -> list[str]:
    """The standard generation options set in `config` that diffusion sampling has no meaning for (beam search,
    key-value caches, assistants, scores and attentions of autoregressive steps, ...): every field of
    `GenerationConfig` not in HONOURED_OPTIONS whose value asks for something."""
    defaults = vars(GenerationConfig())
    refused = []
    for name, default in defaults.items():
        value = getattr(config, name, default)
        if name in HONOURED_OPTIONS or value is None or value == default or value == NEUTRAL_VALUES.get(name, default):
            continue
        if isinstance(value, (dict, list)) and not value:
            continue
        refused.append(name)
    return refused


def check_token_ids(config: GenerationConfig, vocab_size: int) -> None:
    """Refuse special token ids outside the vocabulary [0, vocab_size)."""
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "mask_token_id"):
        value = getattr(config, name, None)
        values = [] if value is None else [value] if isinstance(value, int) else list(value)
        for token in values:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
                raise ValueError(f"`{name}` ({value!r}) must be token ids in the vocabulary [0, {vocab_size})")


def check_sampling_values(config: GenerationConfig) -> None:
    """Refuse non-finite sampling settings (transformers checks their ranges, not NaN or infinity)."""
    for name in ("temperature", "top_p", "min_p", "typical_p", "repetition_penalty", "epsilon_cutoff", "eta_cutoff"):
        value = getattr(config, name, None)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise ValueError(f"`{name}` must be a finite number, got {value!r}")


@dataclass(frozen=True)
class GenerationPlan:
    """What a generation does, before it runs.

    prompt_length: P, the prompts' (padded) width; new tokens go to positions P to P + num_new_tokens.
    blocks: each block's columns [start, end) of the canvas the denoiser reads, left to right. Full-sequence models:
        the canvas is the prompts followed by the new tokens, blocks hold new positions, the last possibly shorter,
        and the first block also fills the masks in the prompts (infilling; infilling only: one block of no new
        positions). Block diffusion models: the model's own blocks, see `plan_block_generation`.
    steps: the denoising steps of each block, or None for one token per step (as many steps as a block has masks).
        A block never takes more forward passes than its steps.
    row_steps: None when every row takes a block's `steps`; else each row's steps of each block (B, blocks), and
        `steps` their maximum: rows whose blocks hold different numbers of masks spread `steps` each on their own.
    offsets: None for the canvas above; else (B,) where each row's columns lie on the canvas: row b's position j
        (prompts left-padded to P, then the new tokens) is canvas column j + offsets[b], and the canvas is
        `canvas_width` wide (its columns outside a row's tokens are padding).
    """

    prompt_length: int
    num_new_tokens: int
    blocks: tuple[tuple[int, int], ...]
    steps: Optional[tuple[int, ...]]
    offsets: Optional[tuple[int, ...]] = None
    canvas_width: Optional[int] = None
    row_steps: Optional[tuple[tuple[int, ...], ...]] = None

    @property
    def length(self) -> int:
        return self.prompt_length + self.num_new_tokens

    @property
    def width(self) -> int:
        """The canvas's width."""
        return self.length if self.canvas_width is None else self.canvas_width


def new_token_count(prompt_length: int, has_prompt_masks: bool, max_new_tokens: Optional[int],
                    max_length: Optional[int]) -> int:
    """How many tokens to append: `max_new_tokens`, else what `max_length` leaves after the prompt, else none when
    the prompt has masks to fill (infilling only)."""
    if max_new_tokens is not None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"`max_new_tokens` must be a non-negative integer, got {max_new_tokens!r}")
        if max_new_tokens == 0 and not has_prompt_masks:
            raise ValueError("`max_new_tokens` is 0 and the prompt has no mask to fill: nothing to generate")
        return max_new_tokens
    if max_length is not None:
        num_new = max_length - prompt_length
        if num_new < 0 or (num_new == 0 and not has_prompt_masks):
            raise ValueError(f"`max_length` ({max_length}) leaves no room after the prompt ({prompt_length} tokens)")
        return num_new
    if has_prompt_masks:
        return 0
    raise ValueError("nothing to generate: set `max_new_tokens` (or put mask tokens in `input_ids`)")


def spread_steps(steps: int, sizes: list[int]) -> tuple[int, ...]:
    """`steps` spread over blocks of `sizes` masks: one each, and the rest in proportion to their sizes, rounded so
    that the blocks' steps add up to `steps` exactly and the remainder goes to the first blocks (as LLaDA spreads a
    block's masks over its steps). Equal sizes get steps // len(sizes) each, plus one for the first steps % len."""
    if steps < len(sizes):
        raise ValueError(
            f"`steps` ({steps}) is fewer than the blocks ({len(sizes)}): each block takes at least one step; ask for "
            f"more steps or a longer `block_length`"
        )
    spare, total, cumulative, bounds = steps - len(sizes), sum(sizes), 0, [0]
    for size in sizes:
        cumulative += size
        bounds.append(-(-spare * cumulative // total) if total else spare)  # ceil(spare * cumulative / total)
    return tuple(1 + high - low for low, high in zip(bounds, bounds[1:]))


def check_positions(prompt_length: int, num_new: int, max_positions: Optional[int]) -> None:
    if max_positions is not None and prompt_length + num_new > max_positions:
        raise ValueError(
            f"the prompt ({prompt_length} tokens) and `max_new_tokens` ({num_new}) need {prompt_length + num_new} "
            f"positions, more than the model's max_position_embeddings ({max_positions})"
        )


def plan_generation(prompt_length: int, has_prompt_masks: bool, max_new_tokens: Optional[int],
                    max_length: Optional[int], block_length: Optional[int], steps: Optional[int],
                    max_positions: Optional[int] = None) -> GenerationPlan:
    """The plan of a full-sequence model for prompts of width `prompt_length` (see `GenerationPlan`);
    `max_positions` is the model's `max_position_embeddings`, which the whole sequence must fit."""
    num_new = new_token_count(prompt_length, has_prompt_masks, max_new_tokens, max_length)
    check_positions(prompt_length, num_new, max_positions)
    width = block_length or max(num_new, 1)
    starts = range(prompt_length, prompt_length + num_new, width)
    blocks = tuple((start, min(start + width, prompt_length + num_new)) for start in starts) or (
        (prompt_length, prompt_length),)
    step_counts = None if steps is None else spread_steps(steps, [end - start for start, end in blocks])
    return GenerationPlan(prompt_length, num_new, blocks, step_counts)


def plan_block_generation(prompt_lengths: list[int], prompt_width: int, prompt_masks: list[list[int]],
                          max_new_tokens: Optional[int], max_length: Optional[int], block_length: Optional[int],
                          steps: Optional[int], block_size: int, max_positions: Optional[int] = None) -> GenerationPlan:
    """The plan of a block diffusion model (blocks of `block_size` tokens counted from each row's first token), for
    prompts of `prompt_lengths` tokens left-padded to `prompt_width`, with masks to fill at the positions
    `prompt_masks[b]` (of the padded width).

    The generation blocks are the model's blocks, so each is denoised against the exact cache of the ones before it:
    a prompt whose length is not a multiple of the block size ends inside a block, and its last tokens join the first
    generated block (which then holds fewer new tokens). A block of the prompt that holds masks is denoised in its
    turn, as a generated block is, the prompt's blocks after it read its filled tokens. Rows are placed on the canvas
    so that the blocks of every row start at the same columns: each row's last prompt block at the same block, its
    complete blocks before it (with whole blocks of padding before a shorter prompt), its new tokens after it, and the
    canvas padded to whole blocks. Blocks with nothing to fill are not planned (the denoiser consumes them). Each row
    spreads `steps` over its blocks in proportion to their masks, as it would alone (so a prompt gives the same
    tokens in any batch); a block takes as many passes as its row with most steps there."""
    if block_length is not None and block_length != block_size:
        raise ValueError(f"`block_length` ({block_length}) must be the block diffusion model's block size "
                         f"({block_size}) or None: a block model generates its own blocks")
    num_new = new_token_count(prompt_width, any(prompt_masks), max_new_tokens, max_length)
    check_positions(prompt_width, num_new, max_positions)
    origin = max(length // block_size for length in prompt_lengths) * block_size  # where the last prompt blocks start
    offsets = tuple(origin + length % block_size - prompt_width for length in prompt_lengths)
    width = -(-(prompt_width + num_new + max(offsets)) // block_size) * block_size
    to_fill = []  # per row, per canvas block, the masks to fill
    for offset, masks in zip(offsets, prompt_masks):
        columns = [offset + position for position in masks]
        columns += range(offset + prompt_width, offset + prompt_width + num_new)
        to_fill.append([0] * (width // block_size))
        for column in columns:
            to_fill[-1][column // block_size] += 1
    planned = [index for index in range(width // block_size) if any(row[index] for row in to_fill)]
    blocks = tuple((index * block_size, (index + 1) * block_size) for index in planned)
    if steps is None:
        return GenerationPlan(prompt_width, num_new, blocks, None, offsets, width)
    row_steps = tuple(row_block_steps(steps, [row[index] for index in planned]) for row in to_fill)
    step_counts = tuple(max(column) for column in zip(*row_steps))
    return GenerationPlan(prompt_width, num_new, blocks, step_counts, offsets, width, row_steps)


def row_block_steps(steps: int, sizes: list[int]) -> tuple[int, ...]:
    """A row's `steps` spread over the blocks where it has masks (`spread_steps`), none where it has none."""
    spread = iter(spread_steps(steps, [size for size in sizes if size]))
    return tuple(next(spread) if size else 0 for size in sizes)
