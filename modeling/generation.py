"""`DiffuAprielForMaskedLM.generate`: masked diffusion sampling, as transformers users call `generate()`.

Generation runs in semi-autoregressive blocks of `block_length` new tokens, left to right (the last block may be
shorter); masks already in the prompt (infilling) are filled together with the first block. A committed token is
never changed again. `generate()` composes three parts:

- a plan (`generation_plan.plan_generation`): which options apply, how many new tokens, in which blocks, with how
  many steps each, decided before any forward pass;
- the sampling math (`sampling.propose_tokens`, `sampling.choose_commits`): at each step, a token for every mask of
  the block and which of them to commit;
- a denoiser (`denoisers.make_denoiser`): the forward passes, eager, from CUDA graphs or with the block cache.

Observers of the steps (`on_step`: progress bars, the streamer's drafts, pass counts, the history) see a
`StepReport` after every step.
"""

import copy
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.generation.stopping_criteria import MaxTimeCriteria, StoppingCriteriaList, StopStringCriteria
from transformers.utils import ModelOutput, logging

from .denoisers import make_denoiser
from .diffusion import INTEGER_DTYPES
from .generation_plan import (
    GenerationPlan,
    check_sampling_values,
    check_token_ids,
    plan_block_generation,
    plan_generation,
    refused_options,
)
from .sampling import (
    REMASKING_RULES,
    CandidateSampler,
    choose_commits,
    pad_after_eos,
    propose_tokens,
    row_generators,
)

logger = logging.get_logger(__name__)


class DiffusionGenerationConfig(GenerationConfig):
    r"""
    Generation settings of a masked diffusion LM. Saved with the model as `generation_config.json`.

    Besides the standard options of `GenerationConfig` that mean something for diffusion sampling (lengths, the
    sampling options, special tokens, stopping, `num_return_sequences`, `return_dict_in_generate`; the others are
    refused by name, `generation_plan.HONOURED_OPTIONS` lists them):

    Args:
        steps: denoising steps over the whole generation, spread over the blocks in proportion to their new tokens
            (equally where `block_length` divides them, the remainder to the first blocks); each block takes at least
            one, and no generation takes more forward passes. `None`: one token per step.
        block_length: new tokens per semi-autoregressive block; the last block holds what is left, so any number of
            new tokens works. `None`: one block of all new tokens.
        remasking: which masks to commit at a step: `"low_confidence"`, `"margin"`, `"entropy"`, `"random"` or
            `"ancestral"` (MDLM's sampler: each mask is revealed with the reverse-process probability, and the
            forward pass is skipped after a step that changed nothing).
        confidence_threshold: parallel decoding: every mask whose chosen token has at least this probability is
            committed at the step, whatever the remasking rule; the rule chooses among the others only as many as
            the step schedule's minimum still asks for (so at least one a step). With `steps` unset (one token a
            step at least) and `low_confidence`, this is Fast-dLLM's threshold decoding, token for token; a smaller
            `steps` raises the minimum, so a step may commit more than the threshold alone would.
        use_block_cache: reuse what the tokens outside the current block contribute (each layer's Mamba states
            entering the block from both sides, the attention keys and values outside it) across the block's
            steps, recorded by a whole-sequence pass at the block's first step; the later steps then run on the
            block alone. Approximate, as Fast-dLLM's dual cache: the recorded context does not see the tokens the
            block commits after its first step (benchmarks/block_cache.py measures the speed-up and the changes).
            On CUDA the block's later steps replay one CUDA graph, fed each block's recording; the recording pass
            runs eagerly. It pays with long contexts (5.6x faster with a 16K-token prompt and a 1.3B model on an
            H200), not with small models on short ones (benchmarks/results/block_cache_gpu*.md).
        use_cache (standard field): on a block diffusion model (`config.block_size`), denoise each block against the
            exact cache of the blocks before it (True, the default: the tokens and logits of whole-sequence passes,
            at a step cost that does not grow with the context for the Mamba layers), or run every step over the
            whole sequence (False). A block model generates its own blocks (`block_length` None or its block size);
            a full-sequence model keeps no exact cache.
        mask_token_id: the `[MASK]` token; `generate()` falls back to the model config's.
        output_history: with `return_dict_in_generate=True`, also return the sequence after every step.

    Each candidate's logits go through transformers' own logits processors (`repetition_penalty`,
    `no_repeat_ngram_size`, `bad_words_ids`, eos suppressed before `min_new_tokens` / `min_length`, a
    `logits_processor` passed to generate()), a candidate seen as an autoregressive next token at its position. When
    `do_sample=True` and `temperature > 0` the token is drawn from that distribution warped by `temperature`,
    `top_k`, `top_p`, `min_p`, `typical_p`, `epsilon_cutoff`, `eta_cutoff` (transformers' warpers); otherwise the most
    likely token is chosen. The mask token is never chosen. The remasking rules and the threshold judge the chosen
    tokens by the processed, unwarped distribution.
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
        check_sampling_values(self)
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
        tokens_per_forward: (B,) float, each row's committed tokens over the forward passes it took part in (the
            secondary metric transformers' diffusion models report).
        history: with `output_history=True`, the (B, L) sequence after every denoising step (masks still in place
            where nothing was committed yet).
    """

    sequences: Optional[torch.LongTensor] = None
    num_forward_passes: Optional[int] = None
    tokens_per_forward: Optional[torch.FloatTensor] = None
    history: Optional[tuple[torch.LongTensor, ...]] = None


@dataclass
class StepReport:
    """What one denoising step did, for the `on_step` observers.

    block, step: the block's index and the step's (counted over the whole generation), from 0.
    sequences: (B, L) after the step (masks where nothing is committed yet); window: the block's window.
    forward_pass: whether the step ran a forward pass (the ancestral sampler skips it after a step that changed
        nothing); rows: (B,) bool, the rows with masks at this step; committed: (B, L) bool, what it committed.
    """

    block: int
    step: int
    sequences: torch.Tensor
    window: slice
    forward_pass: bool
    rows: torch.Tensor
    committed: torch.Tensor


class PassCounter:
    """Counts forward passes, each row's passes and its committed tokens (`on_step` observer)."""

    def __init__(self, batch_size: int, device: torch.device):
        self.passes = 0
        self.row_passes = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.row_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)

    def __call__(self, report: StepReport) -> None:
        if report.forward_pass:
            self.passes += 1
            self.row_passes += report.rows.long()
        self.row_tokens += report.committed.sum(dim=-1)

    def tokens_per_forward(self) -> torch.Tensor:
        return self.row_tokens.float() / self.row_passes.clamp(min=1).float()


class DraftSender:
    """Sends the block being filled after every step to a streamer's `put_draft` (transformers'
    `TextDiffusionStreamer`): the canvas while it is denoised, masks included."""

    def __init__(self, streamer):
        self.streamer = streamer

    def __call__(self, report: StepReport) -> None:
        self.streamer.put_draft(report.sequences[:, report.window].cpu())


class HistoryRecorder:
    """Keeps the sequence after every step (`output_history`)."""

    def __init__(self):
        self.states = []

    def __call__(self, report: StepReport) -> None:
        self.states.append(report.sequences.clone())


# ----------------------------------------------------------------------------------------------------------------------
# Before the first pass: the prompts, the candidates' processors, the stopping criteria.


def prepare_prompts(input_ids, attention_mask, config: DiffusionGenerationConfig,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked (B * num_return_sequences, P) prompts and their attention mask, each prompt repeated in a row
    `num_return_sequences` times. None: a single prompt of the BOS token (or an empty one)."""
    if input_ids is None:
        if attention_mask is not None:
            raise ValueError("`attention_mask` was given without `input_ids`")
        prompt = [] if config.bos_token_id is None else [config.bos_token_id]
        input_ids = torch.tensor([prompt], dtype=torch.long, device=device)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must be a (batch, length) tensor, got {getattr(input_ids, 'shape', input_ids)}")
    if input_ids.dtype not in INTEGER_DTYPES:
        raise TypeError(f"`input_ids` must be an integer tensor, got {input_ids.dtype}")
    input_ids = input_ids.to(device=device, dtype=torch.long)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"`attention_mask` must have the shape of `input_ids` {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("`attention_mask` must hold only 0 (padding) and 1 (tokens)")
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
        raise ValueError("`attention_mask` must pad on the left (tokenizer.padding_side = 'left')")
    copies = config.num_return_sequences or 1
    return input_ids.repeat_interleave(copies, dim=0), attention_mask.repeat_interleave(copies, dim=0)


def plan_for(model_config, config: DiffusionGenerationConfig, input_ids: torch.Tensor,
             attention_mask: torch.Tensor) -> GenerationPlan:
    """The plan of a full-sequence model (`plan_generation`) or of a block diffusion model (`plan_block_generation`)
    for these prompts."""
    masks = (input_ids == config.mask_token_id) & attention_mask.bool()  # (B, P) the prompts' masks to fill
    max_positions = getattr(model_config, "max_position_embeddings", None)
    if model_config.block_size is None:
        return plan_generation(input_ids.shape[1], bool(masks.any()), config.max_new_tokens, config.max_length,
                               config.block_length, config.steps, max_positions)
    if config.use_block_cache:
        raise ValueError("`use_block_cache` (the approximate cache of full-sequence models) does not apply to a block "
                         "diffusion model, whose cache is exact (`use_cache`, on by default)")
    return plan_block_generation(
        attention_mask.sum(-1).tolist(), input_ids.shape[1], [row.nonzero().flatten().tolist() for row in masks],
        config.max_new_tokens, config.max_length, config.block_length, config.steps, model_config.block_size,
        max_positions,
    )


def eos_ids(config: GenerationConfig) -> list[int]:
    eos = config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def candidate_sampler(config: DiffusionGenerationConfig, prompt_length: int,
                      logits_processor: Optional[LogitsProcessorList]) -> CandidateSampler:
    """The candidates' processors (transformers' own classes) from the config's options, then the caller's, and
    the warpers that filter what is sampled."""
    eos, processors = eos_ids(config), LogitsProcessorList()
    if config.min_length and eos:
        processors.append(MinLengthLogitsProcessor(config.min_length, eos))
    if config.min_new_tokens and eos:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, config.min_new_tokens, eos))
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.no_repeat_ngram_size:
        processors.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    if config.bad_words_ids:
        processors.append(NoBadWordsLogitsProcessor(config.bad_words_ids, eos or None))
    processors.extend(logits_processor or [])
    sampling = bool(config.do_sample) and (config.temperature is None or config.temperature > 0)
    warpers = LogitsProcessorList()
    if not sampling:
        return CandidateSampler(processors, warpers, sampling)
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(config.temperature)))
    for warper, value, neutral in ((TopKLogitsWarper, config.top_k, 0), (TopPLogitsWarper, config.top_p, 1.0),
                                   (MinPLogitsWarper, config.min_p, 0.0), (TypicalLogitsWarper, config.typical_p, 1.0),
                                   (EpsilonLogitsWarper, config.epsilon_cutoff, 0.0),
                                   (EtaLogitsWarper, config.eta_cutoff, 0.0)):
        if value is not None and value != neutral:
            warpers.append(warper(value))
    return CandidateSampler(processors, warpers, sampling)


def stopping_lists(config: DiffusionGenerationConfig, stopping_criteria,
                   tokenizer) -> tuple[StoppingCriteriaList, StoppingCriteriaList]:
    """The criteria checked each time a block is committed: those that end a row at a token (`stop_strings`, with
    the `tokenizer` passed to generate(), then the caller's), checked on the sequence up to each of the block's
    positions as an autoregressive model's would be; and `max_time`, checked once, at the block's end."""
    at_tokens, at_blocks = StoppingCriteriaList(), StoppingCriteriaList()
    if config.stop_strings is not None:
        if tokenizer is None:
            raise ValueError("`stop_strings` needs the tokenizer: pass `tokenizer=` to generate()")
        at_tokens.append(StopStringCriteria(tokenizer, config.stop_strings))
    at_tokens.extend(stopping_criteria or [])
    if config.max_time is not None:
        at_blocks.append(MaxTimeCriteria(config.max_time))
    return at_tokens, at_blocks


def random_streams(config: DiffusionGenerationConfig, sampler: CandidateSampler, seed, generator, batch_size: int,
                   device: torch.device):
    """Each returned row's random generator where the call draws (sampling, or the random and ancestral remasking
    rules), else None: `batch_size` rows of `num_return_sequences` copies of each prompt."""
    if not (sampler.sampling or config.remasking in ("random", "ancestral")):
        return None
    copies = config.num_return_sequences or 1
    return row_generators(seed, generator, batch_size // copies, device, copies)


def step_observers(batch_size: int, device: torch.device, config: DiffusionGenerationConfig, on_step, streamer):
    """(the pass counter, the history recorder or None, every `on_step` observer of the run): the counter, the
    history (`output_history`), the caller's `on_step`, and drafts for a streamer with `put_draft`."""
    counter = PassCounter(batch_size, device)
    history = HistoryRecorder() if config.output_history else None
    observers = [counter] + [o for o in (history, on_step) if o is not None]
    if streamer is not None and hasattr(streamer, "put_draft"):
        observers.append(DraftSender(streamer))
    return counter, history, observers


# ----------------------------------------------------------------------------------------------------------------------
# The run: the canvas, block after block.


class DiffusionRun:
    """The state of one generation: the canvas `sequences` (B, L) the denoiser reads (prompts, then masks, laid out as
    the plan says), which rows are finished, and the step loop that fills a block (`fill_block`) and commits it
    (`close_block`). `standard` gives a canvas tensor in the prompts-then-new-tokens layout of the output, which is
    also what the logits processors and stopping criteria read."""

    def __init__(self, plan: GenerationPlan, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 config: DiffusionGenerationConfig, sampler: CandidateSampler, generators, observers: list):
        batch, device = input_ids.shape[0], input_ids.device
        self.plan, self.config, self.sampler, self.generators, self.observers = plan, config, sampler, generators, observers
        self.mask_id = config.mask_token_id
        new_masks = torch.full((batch, plan.num_new_tokens), self.mask_id, dtype=torch.long, device=device)
        self.prompts = torch.cat([input_ids, new_masks], dim=1)  # (B, P + N): the output's layout, as given
        real = torch.cat([attention_mask, attention_mask.new_ones(batch, plan.num_new_tokens)], dim=1).bool()
        offsets = plan.offsets if plan.offsets is not None else (0,) * batch
        self.offsets = torch.tensor(offsets, device=device)  # (B,) canvas column of each row's position 0
        self.columns = (self.offsets[:, None] + torch.arange(plan.length, device=device)).clamp(0, plan.width - 1)
        # The positions that lie on the canvas: all of them, or (rows placed block-aligned) the rows' tokens only.
        self.placed = real if plan.offsets is not None else torch.ones_like(real)  # (B, P + N)
        self.placed_at = (*self.placed.nonzero(as_tuple=True)[:1], self.columns[self.placed])
        self.sequences = self.on_canvas(self.prompts, self.mask_id)  # (B, L)
        self.attention = self.on_canvas(real.long(), 0)
        self.positions = torch.arange(plan.width, device=device)
        new_tokens = torch.arange(plan.length, device=device) >= plan.prompt_length
        self.generated = self.on_canvas(new_tokens.expand(batch, -1), False)  # (B, L) the new tokens
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.steps_taken = 0

    def on_canvas(self, tensor: torch.Tensor, fill) -> torch.Tensor:
        """A (B, P + N) tensor of the output's layout placed on the canvas (B, L), `fill` where no row's token lies."""
        canvas = torch.full((tensor.shape[0], self.plan.width), fill, dtype=tensor.dtype, device=tensor.device)
        canvas[self.placed_at] = tensor[self.placed]
        return canvas

    def standard(self, canvas: torch.Tensor, fill) -> torch.Tensor:
        """A canvas tensor (B, L) in the output's layout (B, P + N), `fill` where it is not on the canvas."""
        return torch.where(self.placed, canvas.gather(1, self.columns), fill)

    def block_masks(self, index: int) -> torch.Tensor:
        """(B, L) bool: the masks block `index` fills (for a full-sequence model, the first block also the
        prompts')."""
        start, end = self.plan.blocks[index]
        region = (self.positions >= start) & (self.positions < end)  # (L,)
        if index == 0 and self.plan.offsets is None:
            region = region | (self.positions < self.plan.prompt_length)
        return (self.sequences == self.mask_id) & region & self.attention.bool()

    def fill_block(self, index: int, denoiser) -> None:
        """Denoise block `index` until it has no mask: at most its planned steps (with `steps` unset, one per mask
        of its fullest row), each a forward pass but where the ancestral sampler has nothing new to predict."""
        in_block = self.block_masks(index)
        if not bool(in_block.any()):
            return
        # The window: from the first position with a mask to fill in any row to the block's end. Only its logits are
        # computed (all the sampler reads), and the block cache reuses what lies outside it.
        window = slice(int(in_block.any(dim=0).nonzero()[0]), self.plan.blocks[index][1])
        remaining = in_block.sum(dim=-1)  # (B,)
        planned = self.plan.steps[index] if self.plan.steps is not None else int(remaining.max())
        if self.plan.row_steps is not None:
            steps_left = torch.tensor([row[index] for row in self.plan.row_steps], device=remaining.device)
        else:
            steps_left = remaining.clone() if self.plan.steps is None else torch.full_like(remaining, planned)
        logits, stale = None, torch.ones_like(self.finished)  # stale: rows whose input changed since their logits
        denoiser.start_block(window)
        for _ in range(planned):
            active = remaining > 0
            forward_pass = logits is None or self.config.remasking != "ancestral" or bool((stale & active).any())
            if forward_pass:
                # MDLM: a row whose tokens did not change since its last prediction keeps it (its input is the same).
                fresh = denoiser(self.sequences)  # (B, K, V)
                keep = logits is not None and self.config.remasking == "ancestral"
                logits = torch.where(stale[:, None, None], fresh, logits) if keep else fresh
                stale = torch.zeros_like(stale)
            commit = self.step(index, in_block, logits[in_block[:, window]], remaining, steps_left)
            in_block = in_block & ~commit
            remaining, steps_left = in_block.sum(dim=-1), steps_left - active.long()
            stale = stale | commit.any(dim=-1)
            report = StepReport(index, self.steps_taken, self.sequences, window, forward_pass, active, commit)
            self.steps_taken += 1
            for observe in self.observers:
                observe(report)
            if not bool(in_block.any()):
                break
        denoiser.finish_block(self.sequences)
        if bool(in_block.any()):
            raise RuntimeError(f"generate(): block {index} still has masks after its {planned} planned steps")

    def step(self, index: int, in_block: torch.Tensor, candidate_logits: torch.Tensor, remaining: torch.Tensor,
             steps_left: torch.Tensor) -> torch.Tensor:
        """One step's decisions on the candidates (the masks in_block (B, L), in row-major order, with their logits
        (K, V)): commit some to their proposed tokens in `sequences`; returns what was committed (B, L). Refuses
        logits that are not finite and, but for the ancestral sampler, a step that would commit nothing."""
        where = f"generate(): step {self.steps_taken} (block {index})"
        if not bool(torch.isfinite(candidate_logits).all()):
            raise RuntimeError(f"{where}: the model's logits are not finite (NaN or infinity) at the masks to fill: "
                               "damaged weights, or an overflow in float16 (try bfloat16 or float32)")
        counts = remaining.tolist()
        probs, tokens = propose_tokens(candidate_logits, self.mask_id, self.sampler, counts, self.generators,
                                       self.standard(self.sequences, self.prompts), self.standard(in_block, False))
        commit = choose_commits(self.config.remasking, in_block, probs, tokens, remaining, steps_left,
                                self.config.confidence_threshold, counts, self.generators)  # (B, L)
        if self.config.remasking != "ancestral" and bool(((remaining > 0) & ~commit.any(dim=-1)).any()):
            raise RuntimeError(f"{where}: a row with masks to fill committed none, where the plan commits at least one")
        chosen = torch.full_like(self.sequences, self.mask_id)
        chosen[in_block] = tokens
        self.sequences = torch.where(commit, chosen, self.sequences)
        return commit

    def close_block(self, index: int, stopping: tuple[StoppingCriteriaList, StoppingCriteriaList],
                    streamer) -> None:
        """Block `index` is committed: a row that produced eos in it, or that a stopping criterion ends, is done (its
        tokens after the stop and its later blocks become padding, with nothing to generate); the streamer gets the
        block."""
        start, end = self.plan.blocks[index]
        eos, (at_tokens, at_blocks) = eos_ids(self.config), stopping
        block_done = self.generated & (self.positions < end)
        ended = torch.zeros_like(self.finished)
        if eos:
            ended |= (torch.isin(self.sequences, torch.tensor(eos, device=ended.device)) & block_done).any(dim=-1)
        stops = self.stop_lengths(start, end, at_tokens)  # (B,)
        ended |= stops < self.plan.width
        if at_blocks:
            ended |= at_blocks(self.sequences[:, :end], None).to(ended.device)
            stops = torch.where(ended & ~self.finished, torch.minimum(stops, torch.tensor(end)), stops)
        newly_finished = ended & ~self.finished
        if bool(newly_finished.any()):
            after = self.generated & ~block_done | (self.positions >= stops[:, None].to(ended.device))
            self.sequences = self.sequences.masked_fill(newly_finished[:, None] & self.generated & after,
                                                        self.pad_token_id())
        self.finished |= ended
        if streamer is not None:  # streamers take one row: its new tokens of the block
            shown, offset = self.output(), int(self.offsets[0])
            if index == 0:
                streamer.put(shown[:, : self.plan.prompt_length].cpu())
            streamer.put(shown[:, max(start - offset, self.plan.prompt_length) : end - offset].cpu())

    def stop_lengths(self, start: int, end: int, criteria: StoppingCriteriaList) -> torch.Tensor:
        """(B,) for each row, the canvas column after the shortest prefix ending in the block [start, end) that
        `criteria` stop at (the canvas's width where none does). The criteria read the output's layout, as an
        autoregressive model's sequences would be."""
        stops = torch.full_like(self.finished, self.plan.width, dtype=torch.long)
        if not criteria:
            return stops
        sequences, offsets = self.standard(self.sequences, self.prompts), self.offsets
        for length in range(max(start - int(offsets.max()), 0) + 1, end - int(offsets.min()) + 1):
            in_block = (length + offsets > start) & (length + offsets <= end)
            hit = criteria(sequences[:, :length], None).to(stops.device) & in_block & (stops == self.plan.width)
            stops = torch.where(hit, length + offsets, stops)
        return stops

    def pad_token_id(self) -> Optional[int]:
        eos = eos_ids(self.config)
        return self.config.pad_token_id if self.config.pad_token_id is not None else (eos[0] if eos else None)

    def output(self) -> torch.Tensor:
        """The sequences in the output's layout (the prompts as given, then the new tokens), padded after each row's
        first generated eos."""
        eos = eos_ids(self.config)
        done = pad_after_eos(self.sequences, self.generated, eos, self.pad_token_id()) if eos else self.sequences
        return self.standard(done, self.prompts)


def generation_output(config: DiffusionGenerationConfig, run: DiffusionRun, counter: PassCounter,
                      history: Optional[HistoryRecorder]):
    """What generate() returns: the sequences, or with `return_dict_in_generate` a `DiffusionGenerateOutput` that adds
    the forward passes, each row's tokens per forward pass and the canvas after every step (`output_history`)."""
    if not config.return_dict_in_generate:
        return run.output()
    return DiffusionGenerateOutput(
        sequences=run.output(), num_forward_passes=counter.passes, tokens_per_forward=counter.tokens_per_forward(),
        history=tuple(run.standard(s, run.prompts) for s in history.states) if history is not None else None,
    )


class DiffusionGenerationMixin:
    """`generate()` for masked diffusion LMs. Mixed into `DiffuAprielForMaskedLM` ahead of `PreTrainedModel`, which
    builds `model.generation_config` from `generation_config_class` and the model config, and saves it."""

    generation_config_class = DiffusionGenerationConfig

    def adjust_generation_fn(
        self, generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path, **kwargs
    ):
        """Called by `from_pretrained`: load the checkpoint's `generation_config.json` as a
        `DiffusionGenerationConfig` (or use the `generation_config` passed to `from_pretrained`, as given); without the
        file, keep the one built from the model config. On a block model, a saved `block_length` other than its block
        size is dropped (set to None, with a warning)."""
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
            return
        block_size, block_length = self.config.block_size, self.generation_config.block_length
        if block_size is not None and block_length not in (None, block_size):
            # The file comes from the full-sequence model this block model was made from (`from_pretrained(folder,
            # block_size=...)`, or fine-tuning one into a block model): its generation blocks do not apply here, and
            # generate() would refuse them by default, since a block model generates in its own blocks.
            logger.warning(
                f"generation_config.json sets block_length {block_length}, but this block diffusion model generates "
                f"in its own blocks of {block_size} tokens: block_length set to None"
            )
            self.generation_config.block_length = None

    def prepare_inputs_for_generation(self, *args, **kwargs):
        """Refused: transformers' token-by-token `GenerationMixin.generate` calls this for each new token, and
        `generate()` here denoises a whole canvas instead. The method exists because PEFT's
        `task_type="CAUSAL_LM"` wrapper reads it when it wraps the model (and calls it only from that token-by-token
        loop, which never runs here): with it, that wrapper trains, saves, merges and calls this `generate()`."""
        raise NotImplementedError(
            f"{type(self).__name__} generates by diffusion, not token by token: call model.generate(), which prepares "
            "no per-token inputs"
        )

    def _resolve_generation_config(self, generation_config, kwargs) -> DiffusionGenerationConfig:
        """The call's settings: the generation config (the model's by default) updated by `kwargs`, every option
        honoured or refused by name."""
        base = self.generation_config if generation_config is None else generation_config
        if not isinstance(base, DiffusionGenerationConfig):
            base = DiffusionGenerationConfig.from_dict(base.to_dict())
        config = copy.deepcopy(base)
        unused = config.update(**kwargs)
        if unused:
            raise ValueError(f"generate() got arguments that are not generation settings: {sorted(unused)}")
        refused = refused_options(config)
        if refused:
            settings = ", ".join(f"`{name}`={getattr(config, name)!r}" for name in refused)
            raise ValueError(f"{settings}: no meaning in diffusion sampling (no beam search, key-value cache or "
                             "autoregressive scores); unset to generate")
        if config.mask_token_id is None:
            config.mask_token_id = self.config.mask_token_id
        if config.mask_token_id is None:
            raise ValueError("`mask_token_id` is not set: set it in the model config or the generation config")
        check_token_ids(config, self.config.vocab_size)
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
        logits_processor: Optional[LogitsProcessorList] = None,
        stopping_criteria: Optional[StoppingCriteriaList] = None,
        tokenizer=None,
        on_step: Optional[Callable[[StepReport], None]] = None,
        **kwargs,
    ) -> Union[torch.LongTensor, DiffusionGenerateOutput]:
        r"""
        Generate by masked diffusion: append `max_new_tokens` masks to each prompt (and fill the masks already in it),
        then denoise block by block.

        Args:
            input_ids: (B, P) prompts, left-padded; their mask tokens are filled (infilling). None: one BOS prompt.
            attention_mask: (B, P), 0 at padding, which must be on the left. None: no padding.
            generation_config: a `DiffusionGenerationConfig` (default `self.generation_config`); `**kwargs` override
                its fields for this call. Every standard option is honoured or refused by name.
            streamer: `put(tokens)` with the prompt and then each committed block, then `end()` (transformers'
                `TextStreamer`); with `put_draft` (`TextDiffusionStreamer`), also the block after every step.
            generator, seed: repeatability without the global RNG. An int `seed` (or a `torch.Generator`, from which
                one is drawn) seeds every prompt alike, so a prompt gives the same tokens alone or in any batch; a
                list (seeds per prompt, generators per returned row) gives rows their own streams, as do copies of
                `num_return_sequences`.
            logits_processor: transformers `LogitsProcessor`s applied to every candidate's scores after the config's.
            stopping_criteria: transformers `StoppingCriteria`, checked when a block is committed, as are `max_time`
                and `stop_strings` (which need `tokenizer`): a row they end is padded after that block.
            on_step: called with a `StepReport` after every denoising step.

        Returns:
            (B * num_return_sequences, P + max_new_tokens) token ids, or a `DiffusionGenerateOutput` with
            `return_dict_in_generate=True`.
        """
        config = self._resolve_generation_config(generation_config, kwargs)
        input_ids, attention_mask = prepare_prompts(input_ids, attention_mask, config, self.device)
        plan = plan_for(self.config, config, input_ids, attention_mask)
        sampler = candidate_sampler(config, plan.prompt_length, logits_processor)
        stopping = stopping_lists(config, stopping_criteria, tokenizer)
        generators = random_streams(config, sampler, seed, generator, input_ids.shape[0], self.device)
        counter, history, observers = step_observers(input_ids.shape[0], self.device, config, on_step, streamer)
        run = DiffusionRun(plan, input_ids, attention_mask, config, sampler, generators, observers)
        if any(stopping) and run.pad_token_id() is None:
            raise ValueError("ending rows by `stopping_criteria`/`stop_strings`/`max_time` needs a `pad_token_id`")
        model_attention = None if bool(run.attention.all()) else run.attention
        # use_cache None (GenerationConfig's default) means True, as in transformers' own generate().
        with make_denoiser(self, config.use_block_cache, config.use_cache is not False, model_attention) as denoiser:
            for index in range(len(plan.blocks)):
                run.fill_block(index, denoiser)
                run.close_block(index, stopping, streamer)
                if bool(run.finished.all()):
                    break
        if streamer is not None:
            streamer.end()
        return generation_output(config, run, counter, history)


__all__ = ["DiffusionGenerationConfig", "DiffusionGenerationMixin", "DiffusionGenerateOutput", "StepReport"]
