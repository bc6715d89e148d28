"""Diffusion sampling for `DiffuAprielForMaskedLM.generate`.

A masked diffusion LM generates by starting from `[MASK]` tokens and, step by step, committing some of them to tokens
predicted by the denoiser, until none is left. Which masks are committed at a step is the *remasking rule*:

- `low_confidence` (LLaDA): the masks whose predicted token has the highest probability;
- `margin`: the largest gap between the first and second most likely tokens;
- `entropy`: the lowest entropy of the predicted distribution;
- `random`: uniformly at random;
- `ancestral` (MDLM): each mask independently, with the probability of MDLM's reverse process between two times.

Generation runs in semi-autoregressive blocks of `block_length` new tokens, left to right; masks already in the
prompt (infilling) are filled together with the first block. A committed token is never changed again.

The sampling math is a set of small pure functions on tensors; `DiffusionGenerationMixin.generate` composes them,
and calls the model through one method, `denoising_logits`, so that the denoising step can be wrapped (CUDA graphs,
`torch.compile`) in one place.

Randomness: every row of a batch draws from its own `torch.Generator`, only when the row has masks to fill, and over
tensors whose shapes depend on that row alone, so a prompt gives the same tokens in any batch as on its own with the
same seed. The global RNG is never used.
"""

import contextlib
import copy
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from transformers import GenerationConfig
from transformers.utils import ModelOutput, logging

from .cache import BlockContext
from .cuda_graphs import graphed_denoiser
from .diffusion import INTEGER_DTYPES

logger = logging.get_logger(__name__)

REMASKING_RULES = ("low_confidence", "margin", "entropy", "random", "ancestral")


class DiffusionGenerationConfig(GenerationConfig):
    r"""
    Generation settings of a masked diffusion LM. Saved with the model as `generation_config.json`.

    Besides `GenerationConfig`'s `max_new_tokens` / `max_length`, `do_sample`, `temperature`, `top_k`, `top_p`,
    `eos_token_id`, `pad_token_id`, `bos_token_id` and `return_dict_in_generate`:

    Args:
        steps: denoising steps over the whole generation, shared equally by the blocks. `None`: one token per step.
        block_length: new tokens per semi-autoregressive block; must divide the number of new tokens. `None`: one
            block of all new tokens.
        remasking: which masks to commit at a step: `"low_confidence"`, `"margin"`, `"entropy"`, `"random"` or
            `"ancestral"` (MDLM's sampler: each mask is revealed with the reverse-process probability, and the
            forward pass is skipped after a step that changed nothing).
        confidence_threshold: parallel decoding: every mask whose chosen token has at least this probability is
            committed at the step (with at least the number the step schedule asks for, so at least one).
        use_block_cache: reuse what the tokens outside the current block contribute (each layer's Mamba states
            entering the block from both sides, the attention keys and values outside it) across the block's
            steps, recorded by a whole-sequence pass at the block's first step; the later steps then run on the
            block alone. Approximate, as Fast-dLLM's dual cache: the recorded context does not see the tokens the
            block commits after its first step (benchmarks/block_cache.py measures the speed-up and the changes).
            On CUDA the block's later steps replay one CUDA graph, fed each block's recording; the recording pass
            runs eagerly. It pays with long contexts (5.6x faster with a 16K-token prompt and a 1.3B model on an
            H200), not with small models on short ones (benchmarks/results/block_cache_gpu*.md).
        mask_token_id: the `[MASK]` token; `generate()` falls back to the model config's.
        output_history: with `return_dict_in_generate=True`, also return the sequence after every step.

    Sampling draws from softmax(logits / temperature) filtered by `top_k` / `top_p` when `do_sample=True` and
    `temperature > 0`; otherwise the most likely token is chosen. The mask token is never chosen. The remasking
    rules and the threshold judge the chosen tokens by the model's unfiltered distribution.
    """

    def __init__(self, **kwargs):
        # Set before GenerationConfig.__init__, which ends by calling `validate()`.
        self.steps = kwargs.pop("steps", None)
        self.block_length = kwargs.pop("block_length", None)
        self.remasking = kwargs.pop("remasking", "low_confidence")
        self.confidence_threshold = kwargs.pop("confidence_threshold", None)
        self.use_block_cache = kwargs.pop("use_block_cache", False)
        self.mask_token_id = kwargs.pop("mask_token_id", None)
        self.output_history = kwargs.pop("output_history", False)
        super().__init__(**kwargs)

    def validate(self, strict=False, user_set_attributes=None):
        for name in ("steps", "block_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"`temperature` must be >= 0 (0 chooses the most likely token), got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"`top_k` must be a non-negative integer (0 or None: no top-k), got {self.top_k!r}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"`top_p` must be in (0, 1], got {self.top_p}")
        if self.remasking not in REMASKING_RULES:
            raise ValueError(f"`remasking` must be one of {REMASKING_RULES}, got {self.remasking!r}")
        if self.confidence_threshold is not None:
            if not 0.0 < self.confidence_threshold <= 1.0:
                raise ValueError(f"`confidence_threshold` must be in (0, 1], got {self.confidence_threshold}")
            if self.remasking == "ancestral":
                raise ValueError(
                    "`confidence_threshold` does not apply to remasking='ancestral' (its masks are revealed at random "
                    "times): use another remasking rule or confidence_threshold=None"
                )
        if self.mask_token_id is not None and (not isinstance(self.mask_token_id, int) or self.mask_token_id < 0):
            raise ValueError(f"`mask_token_id` must be a non-negative integer, got {self.mask_token_id!r}")
        if not isinstance(self.output_history, bool):
            raise ValueError(f"`output_history` must be a bool, got {self.output_history!r}")
        if not isinstance(self.use_block_cache, bool):
            raise ValueError(f"`use_block_cache` must be a bool, got {self.use_block_cache!r}")
        super().validate(strict=strict, user_set_attributes=user_set_attributes)

    @classmethod
    def from_model_config(cls, model_config) -> "DiffusionGenerationConfig":
        """The generation config of a freshly built model: the special token ids of its config, defaults elsewhere.
        (GenerationConfig's version copies every matching model-config field and cannot compare our extra fields
        with its defaults.)"""
        config_dict = model_config if isinstance(model_config, dict) else model_config.to_dict()
        token_ids = {
            name: config_dict[name]
            for name in ("mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id")
            if config_dict.get(name) is not None
        }
        generation_config = cls(**token_ids, _from_model_config=True)
        generation_config._original_object_hash = hash(generation_config)
        return generation_config


@dataclass
class DiffusionGenerateOutput(ModelOutput):
    """
    Args:
        sequences: (B, L) the prompts (padding kept) followed by the generated tokens; after an `eos_token_id` in
            the generated part, padding.
        num_forward_passes: number of denoiser forward passes the generation took.
        history: with `output_history=True`, the (B, L) sequence after every denoising step (masks still in place
            where nothing was committed yet).
    """

    sequences: Optional[torch.LongTensor] = None
    num_forward_passes: Optional[int] = None
    history: Optional[tuple[torch.LongTensor, ...]] = None


# ----------------------------------------------------------------------------------------------------------------------
# Sampling math: pure functions.


def num_tokens_to_commit(num_masked: torch.Tensor, steps_left: torch.Tensor) -> torch.Tensor:
    """How many masks to commit now so that `num_masked` masks are spread as evenly as possible over `steps_left`
    steps: ceil(num_masked / steps_left). Applied at every step, this is LLaDA's schedule (the remainder goes to the
    first steps), and it still finishes on time after a step that committed more (confidence threshold).

    num_masked, steps_left: (B,) integer tensors, steps_left >= 1. Returns (B,).
    """
    return torch.div(num_masked + steps_left - 1, steps_left, rounding_mode="floor")


def filter_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None
) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering: logits (N, V) -> (N, V) with -inf at the removed
    tokens. `top_k` None/0 and `top_p` None/1 keep everything; the most likely token is always kept."""
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[..., -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # A token goes when the tokens ranked above it already hold at least top_p of the mass.
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
        remove = (mass_above >= top_p).scatter(-1, order, mass_above >= top_p)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_categorical(probs: torch.Tensor, exponential_noise: torch.Tensor) -> torch.Tensor:
    """One token per row of probs (N, V), given exponential_noise (N, V) of i.i.d. Exp(1) draws: the exponential
    race argmax(p / E), an exact categorical sample (the Gumbel-max trick), whose randomness is all in the noise."""
    return (probs / exponential_noise).argmax(dim=-1)


def confidence_scores(
    rule: str, probs: torch.Tensor, tokens: torch.Tensor, uniform: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """How sure the model is about each candidate, higher = commit first. probs: (N, V) the model's distribution
    (mask token excluded); tokens: (N,) the chosen tokens; uniform: (N,) U(0,1) draws, used by the `random` rule
    only. Returns (N,).

    low_confidence: p(token); margin: p(first) - p(second); entropy: minus the entropy of p; random: uniform."""
    if rule == "low_confidence":
        return probs.gather(-1, tokens[:, None]).squeeze(-1)
    if rule == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    if rule == "entropy":
        return (probs * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))).sum(dim=-1)
    if rule == "random":
        if uniform is None:
            raise ValueError("the `random` remasking rule needs `uniform` draws")
        return uniform
    raise ValueError(f"`remasking` must be one of {REMASKING_RULES[:-1]} for confidence scores, got {rule!r}")


def ancestral_reveal_probability(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """MDLM's reverse step from time t to s < t under the linear schedule alpha_t = 1 - t (the fraction of clean
    tokens): a masked token is revealed with probability (alpha_s - alpha_t) / (1 - alpha_t) = (t - s) / t, its value
    drawn from the denoiser, and otherwise stays masked. At s = 0 every mask is revealed."""
    return (t - s) / t


def select_top(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """For each row of scores (B, L), the `counts[b]` highest entries (-inf entries never; ties go to the leftmost)
    as a (B, L) bool mask."""
    order = scores.sort(dim=-1, descending=True, stable=True).indices  # (B, L)
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(-1, order, positions)  # ranks[b, i]: the rank of entry i
    return (ranks < counts[:, None]) & (scores > float("-inf"))


def pad_after_eos(
    sequences: torch.Tensor, generated: torch.Tensor, eos_token_id: Sequence[int], pad_token_id: int
) -> torch.Tensor:
    """Replace everything after the first eos of the generated positions (B, L) bool by pad_token_id."""
    is_eos = torch.isin(sequences, torch.tensor(eos_token_id, device=sequences.device)) & generated
    after_eos = (is_eos.long().cumsum(dim=-1) - is_eos.long()) > 0
    return sequences.masked_fill(after_eos & generated, pad_token_id)


# ----------------------------------------------------------------------------------------------------------------------
# Per-row random streams.


def _row_generators(seed, generator, batch_size: int, device: torch.device) -> list[torch.Generator]:
    """One generator per row. An int seed (or one drawn from `generator`, or from the OS when neither is given) seeds
    every row alike, so a row's draws never depend on the batch it is in; a list of seeds or of generators gives each
    row its own."""
    if generator is not None and seed is not None:
        raise ValueError("pass `seed` or `generator`, not both")
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size:
            raise ValueError(f"`generator` is a list of {len(generator)} generators for a batch of {batch_size}")
        for g in generator:
            if g.device.type != device.type:
                raise ValueError(f"`generator` must be on the model's device ({device}), got one on {g.device}")
        return list(generator)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator or a list of them, got {type(generator)}")
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 2
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * batch_size
    if len(seeds) != batch_size or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"`seed` must be an int or a list of {batch_size} ints (one per row), got {seed!r}")
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def _draw_per_row(kind: str, counts: list[int], width: int, generators, device) -> torch.Tensor:
    """Concatenated draws for the rows' candidates: counts[b] rows of `width` values from generators[b] (rows with no
    candidate draw nothing). kind: "uniform" or "exponential". Returns (sum(counts), width)."""
    parts = []
    for count, g in zip(counts, generators):
        if count == 0:
            continue
        draw = torch.empty(count, width, device=device, dtype=torch.float32)
        parts.append(draw.uniform_(generator=g) if kind == "uniform" else draw.exponential_(generator=g))
    return torch.cat(parts) if parts else torch.empty(0, width, device=device)


# ----------------------------------------------------------------------------------------------------------------------
# One step's decisions, composed from the functions above.


def propose_tokens(
    candidate_logits: torch.Tensor, mask_token_id: int, config: DiffusionGenerationConfig, sampling: bool,
    counts: list[int], generators,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates' distribution (K, V), mask token excluded, and a token for each (K,) from their logits (K, V):
    drawn from the tempered, filtered distribution when `sampling` (with the rows' generators; counts[b] candidates
    are row b's), else the most likely. The unfiltered distribution is what ranks and thresholds the candidates, so
    that top_k=1 is greedy and a low temperature does not fake confidence."""
    candidate_logits = candidate_logits.float()  # a copy: the caller indexed it out of the model's logits
    candidate_logits[:, mask_token_id] = float("-inf")
    probs = candidate_logits.softmax(dim=-1)
    if not sampling:
        return probs, probs.argmax(dim=-1)
    filtered = filter_logits(candidate_logits, config.temperature or 1.0, config.top_k, config.top_p)
    noise = _draw_per_row("exponential", counts, probs.shape[-1], generators, probs.device)
    return probs, sample_categorical(filtered.softmax(dim=-1), noise)


def choose_commits(
    rule: str, in_block: torch.Tensor, probs: torch.Tensor, tokens: torch.Tensor, remaining: torch.Tensor,
    steps_left: torch.Tensor, confidence_threshold: Optional[float], counts: list[int], generators,
) -> torch.Tensor:
    """Which of the candidates (the True entries of in_block (B, L), in row-major order, with their distributions
    probs (K, V) and tokens (K,)) to commit at this step, as a (B, L) bool mask. `ancestral`: each independently,
    with MDLM's reveal probability for a row with steps_left (B,) steps to go; the other rules: each row's
    `num_tokens_to_commit(remaining, steps_left)` most confident, and with a threshold also every one at least that
    sure."""
    if rule == "ancestral":
        batch, length = in_block.shape
        row_steps_left = steps_left[:, None].expand(batch, length)[in_block].float()  # (K,)
        uniform = _draw_per_row("uniform", counts, 1, generators, probs.device).squeeze(-1)
        commit = torch.zeros_like(in_block)
        commit[in_block] = uniform < ancestral_reveal_probability(row_steps_left, row_steps_left - 1)
        return commit
    uniform = None
    if rule == "random":
        uniform = _draw_per_row("uniform", counts, 1, generators, probs.device).squeeze(-1)
    scores = torch.full(in_block.shape, float("-inf"), device=in_block.device)
    scores[in_block] = confidence_scores(rule, probs, tokens, uniform)
    to_commit = num_tokens_to_commit(remaining, steps_left.clamp(min=1))  # rows without masks: 0
    if confidence_threshold is not None:
        sure = torch.zeros_like(in_block)
        sure[in_block] = probs.gather(-1, tokens[:, None]).squeeze(-1) >= confidence_threshold
        to_commit = torch.maximum(to_commit, sure.sum(dim=-1))
    return select_top(scores, to_commit)


# ----------------------------------------------------------------------------------------------------------------------


class DiffusionGenerationMixin:
    """`generate()` for masked diffusion LMs. Mixed into `DiffuAprielForMaskedLM` ahead of `PreTrainedModel`, which
    builds `model.generation_config` from `generation_config_class` and the model config, and saves it."""

    generation_config_class = DiffusionGenerationConfig

    def adjust_generation_fn(
        self, generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path, **kwargs
    ):
        """Called by `from_pretrained`: load the checkpoint's `generation_config.json` as a
        `DiffusionGenerationConfig` (or use the `generation_config` passed to `from_pretrained`); without the file,
        keep the one built from the model config."""
        if generation_config is not None:
            self.generation_config = DiffusionGenerationConfig.from_dict(generation_config.to_dict())
            return
        if pretrained_model_name_or_path is None:
            return
        loading_kwargs = {
            key: kwargs[key]
            for key in ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")
            if key in kwargs
        }
        try:
            self.generation_config = DiffusionGenerationConfig.from_pretrained(
                pretrained_model_name_or_path, _from_auto=from_auto_class, _from_pipeline=from_pipeline,
                **loading_kwargs,
            )
        except OSError:
            logger.info("No generation_config.json: using the generation config built from the model config.")

    def denoising_logits(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                         logits_to_keep: torch.Tensor) -> torch.Tensor:
        """One denoising forward pass, (B, L) -> logits (B, K, V) at the K positions `logits_to_keep`: the only place
        where `generate` calls the model, so that this step can be wrapped (CUDA graphs, torch.compile) on its own.
        On CUDA the pass is replayed from a CUDA graph captured for the input's shape (`cuda_graphs.GraphedDenoiser`):
        the same logits, bit for bit, without the launch overhead of the ~1,000 kernels of each step."""
        if input_ids.is_cuda:
            return graphed_denoiser(self)(input_ids, attention_mask, logits_to_keep)
        return self(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep,
                    return_dict=True).logits

    def cached_denoising_logits(
        self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], context, logits_to_keep: torch.Tensor
    ) -> torch.Tensor:
        """A denoising pass with the block cache (`use_block_cache`), (B, L) -> the logits (B, K, V) of the context's
        window, whose positions `logits_to_keep` lists: while `context` (a `BlockContext`) is not recorded, a pass
        over the whole sequence that records it; then passes over the window alone."""
        if not context.recorded:
            return self(input_ids=input_ids, attention_mask=attention_mask, block_context=context,
                        logits_to_keep=logits_to_keep, return_dict=True).logits
        window_ids = input_ids[:, context.start : context.end]
        if input_ids.is_cuda:  # the block's window passes replayed from one CUDA graph (its own tensor: copied)
            return graphed_denoiser(self).window(window_ids, context).clone()
        return self(input_ids=window_ids, block_context=context, return_dict=True).logits

    def _resolve_generation_config(self, generation_config, kwargs) -> DiffusionGenerationConfig:
        base = self.generation_config if generation_config is None else generation_config
        if not isinstance(base, DiffusionGenerationConfig):
            base = DiffusionGenerationConfig.from_dict(base.to_dict())
        config = copy.deepcopy(base)
        unused = config.update(**kwargs)
        if unused:
            raise ValueError(f"generate() got arguments that are not generation settings: {sorted(unused)}")
        if config.mask_token_id is None:
            config.mask_token_id = self.config.mask_token_id
        if config.mask_token_id is None:
            raise ValueError("`mask_token_id` is not set: set it in the model config or the generation config")
        return config

    @torch.no_grad()
    def generate(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        generation_config: Optional[GenerationConfig] = None,
        streamer=None,
        generator: Union[torch.Generator, list[torch.Generator], None] = None,
        seed: Union[int, list[int], None] = None,
        **kwargs,
    ) -> Union[torch.LongTensor, DiffusionGenerateOutput]:
        r"""
        Generate by masked diffusion: append `max_new_tokens` masks to each prompt (and fill the masks already in it),
        then denoise block by block.

        Args:
            input_ids: (B, P) prompts, left-padded; `[MASK]` tokens in them are filled (infilling), every other
                token is kept. None: a single prompt of the BOS token (or an empty one).
            attention_mask: (B, P), 0 at padding, which must be on the left. None: no padding.
            generation_config: a `DiffusionGenerationConfig` (default `self.generation_config`); `**kwargs` override
                its fields for this call.
            streamer: receives `put(tokens)` with the prompt (its masks filled) and then each block's tokens as the
                block is committed, then `end()` (transformers' `TextStreamer` protocol).
            generator, seed: make the run repeatable. An int `seed` (or a `torch.Generator`, from which one seed is
                drawn) seeds every row alike: a prompt gives the same tokens alone or in any batch. A list (one seed
                or generator per row) gives rows their own streams. The global RNG is never touched.

        Returns:
            (B, P + max_new_tokens) token ids, or a `DiffusionGenerateOutput` with `return_dict_in_generate=True`.
        """
        config = self._resolve_generation_config(generation_config, kwargs)
        mask_id = config.mask_token_id
        device = self.device
        if input_ids is None:
            if attention_mask is not None:
                raise ValueError("`attention_mask` was given without `input_ids`")
            prompt = [] if config.bos_token_id is None else [config.bos_token_id]
            input_ids = torch.tensor([prompt], dtype=torch.long, device=device)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = getattr(input_ids, "shape", input_ids)
            raise ValueError(f"`input_ids` must be a (batch, length) tensor, got {shape}")
        if input_ids.dtype not in INTEGER_DTYPES:
            raise TypeError(f"`input_ids` must be an integer tensor, got {input_ids.dtype}")
        input_ids = input_ids.to(device=device, dtype=torch.long)
        batch, prompt_length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` must have the shape of `input_ids` {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("`attention_mask` must hold only 0 (padding) and 1 (tokens)")
        attention_mask = attention_mask.to(device=device, dtype=torch.long)
        if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
            raise ValueError("`attention_mask` must pad on the left (tokenizer.padding_side = 'left')")
        prompt_masks = (input_ids == mask_id) & attention_mask.bool()  # (B, P) masks to infill

        # How many new tokens, in how many blocks of how many steps.
        if config.max_new_tokens is not None:
            num_new = config.max_new_tokens
        elif config.max_length is not None:
            num_new = config.max_length - prompt_length
            if num_new < 0 or (num_new == 0 and not bool(prompt_masks.any())):
                raise ValueError(
                    f"`max_length` ({config.max_length}) leaves no room after the prompt ({prompt_length} tokens)"
                )
        elif bool(prompt_masks.any()):
            num_new = 0  # infilling only
        else:
            raise ValueError("nothing to generate: set `max_new_tokens` (or put [MASK] tokens in `input_ids`)")
        max_positions = getattr(self.config, "max_position_embeddings", None)
        if max_positions is not None and prompt_length + num_new > max_positions:
            raise ValueError(
                f"the prompt ({prompt_length} tokens) and `max_new_tokens` ({num_new}) need {prompt_length + num_new} "
                f"positions, more than the model's max_position_embeddings ({max_positions})"
            )
        block_length = config.block_length or num_new
        if num_new % max(block_length, 1):
            raise ValueError(f"`block_length` ({block_length}) must divide the number of new tokens ({num_new})")
        num_blocks = max(num_new // max(block_length, 1), 1)
        steps_per_block = None
        if config.steps is not None:
            if config.steps % num_blocks:
                raise ValueError(f"`steps` ({config.steps}) must be divisible by the number of blocks ({num_blocks})")
            steps_per_block = config.steps // num_blocks

        eos_ids = config.eos_token_id
        eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
        pad_id = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else None)
        sampling = bool(config.do_sample) and (config.temperature is None or config.temperature > 0)
        rule = config.remasking
        needs_generators = sampling or rule in ("random", "ancestral")
        generators = _row_generators(seed, generator, batch, device) if needs_generators else None

        x = torch.cat([input_ids, torch.full((batch, num_new), mask_id, dtype=torch.long, device=device)], dim=1)
        attention = torch.cat([attention_mask, attention_mask.new_ones(batch, num_new)], dim=1)  # (B, L)
        model_attention = None if bool(attention.all()) else attention
        length = x.shape[1]
        positions = torch.arange(length, device=device)
        generated = (positions >= prompt_length).expand(batch, length)  # (B, L) the new tokens
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        num_forward_passes = 0
        history = [] if config.output_history else None
        stale = torch.ones(batch, dtype=torch.bool, device=device)  # rows whose input changed since their logits

        def denoise() -> torch.Tensor:  # the logits (B, K, V) of the block's window
            nonlocal num_forward_passes
            num_forward_passes += 1
            if context is None:
                return self.denoising_logits(x, model_attention, window_positions)
            return self.cached_denoising_logits(x, model_attention, context, window_positions)

        # Nothing runs between the steps of one call that could move the parameters: the CUDA graphs check where
        # they lie once per call, not at every step (about 1 ms of host time a step for a 1.3B model).
        with graphed_denoiser(self).parameters_fixed() if x.is_cuda else contextlib.nullcontext():
            for block in range(num_blocks):
                start = prompt_length + block * block_length
                region = (positions >= start) & (positions < start + block_length)  # (L,)
                if block == 0:
                    region = region | (positions < prompt_length)  # the infilling masks go with the first block
                in_block = (x == mask_id) & region & attention.bool()  # (B, L)
                remaining = in_block.sum(dim=-1)  # (B,)
                steps_left = (remaining.clone() if steps_per_block is None
                              else torch.full_like(remaining, steps_per_block))
                # The window: from the first position with a mask to fill in any row to the block's end. Only its
                # logits are computed (all the sampler reads), and the block cache reuses what lies outside it.
                logits = context = None
                if bool(in_block.any()):
                    window = slice(int(in_block.any(dim=0).nonzero()[0]), start + block_length)
                    window_positions = torch.arange(window.start, window.stop, device=device)
                    if config.use_block_cache:
                        context = BlockContext(window.start, window.stop)
                while bool((remaining > 0).any()):
                    active = remaining > 0
                    if logits is None or rule != "ancestral":
                        logits = denoise()
                    elif bool((stale & active).any()):
                        # MDLM: a row whose tokens did not change since its last prediction keeps it (its input is the
                        # same); the others get new ones.
                        logits = torch.where(stale[:, None, None], denoise(), logits)
                    stale = torch.zeros_like(stale)

                    # Candidates: the masks of the current block, in row-major order (each row's run is contiguous).
                    counts = remaining.tolist()
                    probs, tokens = propose_tokens(logits[in_block[:, window]], mask_id, config, sampling, counts,
                                                   generators)  # (K, V), (K,)
                    commit = choose_commits(rule, in_block, probs, tokens, remaining, steps_left,
                                            config.confidence_threshold, counts, generators)  # (B, L)
                    chosen = torch.full_like(x, mask_id)
                    chosen[in_block] = tokens
                    x = torch.where(commit, chosen, x)
                    in_block = in_block & ~commit
                    remaining = in_block.sum(dim=-1)
                    steps_left = steps_left - active.long()
                    stale = stale | commit.any(dim=-1)
                    if history is not None:
                        history.append(x.clone())

                # A row that produced eos is done: its later blocks become padding, with nothing to generate.
                if eos_ids:
                    block_done = generated & (positions < start + block_length)
                    has_eos = (torch.isin(x, torch.tensor(eos_ids, device=device)) & block_done).any(dim=-1)
                    newly_finished = has_eos & ~finished
                    x = x.masked_fill(newly_finished[:, None] & generated & ~block_done, pad_id)
                    stale = stale | newly_finished
                    finished = finished | has_eos
                if streamer is not None:
                    shown = pad_after_eos(x, generated, eos_ids, pad_id) if eos_ids else x
                    if block == 0:
                        streamer.put(shown[:, :prompt_length].cpu())
                    streamer.put(shown[:, start : start + block_length].cpu())
                if bool(finished.all()):
                    break

        if streamer is not None:
            streamer.end()
        if eos_ids:
            x = pad_after_eos(x, generated, eos_ids, pad_id)
        if not config.return_dict_in_generate:
            return x
        return DiffusionGenerateOutput(
            sequences=x, num_forward_passes=num_forward_passes,
            history=tuple(history) if history is not None else None,
        )


__all__ = ["DiffusionGenerationConfig", "DiffusionGenerationMixin", "DiffusionGenerateOutput"]
