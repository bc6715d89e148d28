"""The sampling math of masked diffusion generation: small pure functions on tensors.

A masked diffusion LM generates by starting from `[MASK]` tokens and, step by step, committing some of them to tokens
predicted by the denoiser, until none is left. At each step `propose_tokens` gives every candidate (a mask of the
block being filled) a distribution and a token, and `choose_commits` says which candidates are committed, by the
*remasking rule*:

- `low_confidence` (LLaDA): the masks whose predicted token has the highest probability;
- `margin`: the largest gap between the first and second most likely tokens;
- `entropy`: the lowest entropy of the predicted distribution;
- `random`: uniformly at random;
- `ancestral` (MDLM): each mask independently, with the probability of MDLM's reverse process between two times.

Randomness: every row of a batch draws from its own `torch.Generator`, only when the row has candidates, and over
tensors whose shapes depend on that row alone, so a prompt gives the same tokens in any batch as on its own with the
same seed. The global RNG is never used.
"""

import os
from typing import Optional, Sequence

import torch
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

__all__ = [
    "REMASKING_RULES",
    "CandidateSampler",
    "ancestral_reveal_probability",
    "choose_commits",
    "confidence_scores",
    "num_tokens_to_commit",
    "pad_after_eos",
    "propose_tokens",
    "row_generators",
    "sample_categorical",
    "select_top",
]

REMASKING_RULES = ("low_confidence", "margin", "entropy", "random", "ancestral")
# Processors that read the scores only, never the tokens before a candidate: one call serves every candidate.
POSITION_FREE = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper, TypicalLogitsWarper,
                 EpsilonLogitsWarper, EtaLogitsWarper)


def num_tokens_to_commit(num_masked: torch.Tensor, steps_left: torch.Tensor) -> torch.Tensor:
    """How many masks to commit now so that `num_masked` masks are spread as evenly as possible over `steps_left`
    steps: ceil(num_masked / steps_left). Applied at every step, this is LLaDA's schedule (the remainder goes to the
    first steps), and it still finishes on time after a step that committed more (confidence threshold).

    num_masked, steps_left: (B,) integer tensors, steps_left >= 1. Returns (B,).
    """
    return torch.div(num_masked + steps_left - 1, steps_left, rounding_mode="floor")


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


def row_generators(seed, generator, batch_size: int, device: torch.device,
                   copies: int = 1) -> list[torch.Generator]:
    """One generator per row of a batch of `batch_size` prompts, each repeated `copies` times in a row
    (`num_return_sequences`). An int seed (or one drawn from `generator`, or from the OS when neither is given) seeds
    every prompt alike, so a row's draws never depend on the batch it is in; a list of seeds gives each prompt its
    own; a list of generators gives each returned row its own. The first copy of a prompt draws from its seed, copy
    j > 0 from a seed drawn from it, so the copies differ."""
    if generator is not None and seed is not None:
        raise ValueError("pass `seed` or `generator`, not both")
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size * copies:
            raise ValueError(f"`generator` is a list of {len(generator)} generators for {batch_size * copies} rows")
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
        raise ValueError(f"`seed` must be an int or a list of {batch_size} ints (one per prompt), got {seed!r}")
    return [torch.Generator(device=device).manual_seed(copy_seed) for s in seeds for copy_seed in _copy_seeds(s, copies)]


def _copy_seeds(seed: int, copies: int) -> list[int]:
    spawn = torch.Generator().manual_seed(seed)
    return [seed] + torch.randint(0, 2**62, (copies - 1,), generator=spawn).tolist()


def draw_per_row(kind: str, counts: list[int], width: int, generators, device) -> torch.Tensor:
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


def process_candidates(processors: LogitsProcessorList, sequences: torch.Tensor, rows: torch.Tensor,
                       positions: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """transformers' logits processors applied to the candidates' scores (K, V): candidate k, at position
    positions[k] of row rows[k] of sequences (B, L), is processed as an autoregressive model's next token there would
    be, given the tokens before it (masks included). Processors that read only the scores run once for all."""
    if not processors:
        return scores
    if all(isinstance(p, POSITION_FREE) for p in processors):
        return processors(sequences[rows], scores)
    processed = torch.empty_like(scores)
    for position in positions.unique().tolist():
        chosen = positions == position
        processed[chosen] = processors(sequences[rows[chosen], :position], scores[chosen])
    return processed


class CandidateSampler:
    """How a candidate's token is chosen: `processors` (transformers' `LogitsProcessor`s: penalties, bans, the eos
    suppressed before `min_new_tokens`, the caller's `logits_processor`) shape the distribution every rule reads;
    when `sampling`, `warpers` (temperature, top-k, top-p, ...) then filter what the token is drawn from."""

    def __init__(self, processors: LogitsProcessorList, warpers: LogitsProcessorList, sampling: bool):
        self.processors, self.warpers, self.sampling = processors, warpers, sampling


def propose_tokens(
    candidate_logits: torch.Tensor, mask_token_id: int, sampler: CandidateSampler, counts: list[int], generators,
    sequences: Optional[torch.Tensor] = None, candidates: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates' distribution (K, V), mask token excluded, and a token for each (K,) from their logits (K, V):
    drawn from the warped distribution when sampling (with the rows' generators; counts[b] candidates are row b's),
    else the most likely. The processed, unwarped distribution is what ranks and thresholds the candidates, so that
    top_k=1 is greedy and a low temperature does not fake confidence. `sequences` (B, L) and `candidates` (B, L) bool
    (the candidates' places, in row-major order) are what the processors read."""
    candidate_logits = candidate_logits.float()  # a copy: the caller indexed it out of the model's logits
    candidate_logits[:, mask_token_id] = float("-inf")
    rows = positions = None
    if sampler.processors or (sampler.sampling and sampler.warpers):
        rows, positions = candidates.nonzero(as_tuple=True)
        candidate_logits = process_candidates(sampler.processors, sequences, rows, positions, candidate_logits)
    probs = candidate_logits.softmax(dim=-1)
    if not sampler.sampling:
        return probs, probs.argmax(dim=-1)
    warped = process_candidates(sampler.warpers, sequences, rows, positions, candidate_logits)
    noise = draw_per_row("exponential", counts, probs.shape[-1], generators, probs.device)
    return probs, sample_categorical(warped.softmax(dim=-1), noise)


def choose_commits(
    rule: str, in_block: torch.Tensor, probs: torch.Tensor, tokens: torch.Tensor, remaining: torch.Tensor,
    steps_left: torch.Tensor, confidence_threshold: Optional[float], counts: list[int], generators,
) -> torch.Tensor:
    """Which of the candidates (the True entries of in_block (B, L), in row-major order, with their distributions
    probs (K, V) and tokens (K,)) to commit at this step, as a (B, L) bool mask.

    `ancestral`: each independently, with MDLM's reveal probability for a row with steps_left (B,) steps to go. The
    other rules: each row's `num_tokens_to_commit(remaining, steps_left)` (the schedule's minimum), chosen by the
    rule's score. With `confidence_threshold`, every candidate whose token is at least that likely is committed
    whatever the rule, and the rule chooses only among the others, as many as the minimum still asks for: with
    `low_confidence` and one token per step at least (`steps` unset), Fast-dLLM's threshold decoding."""
    if rule == "ancestral":
        batch, length = in_block.shape
        row_steps_left = steps_left[:, None].expand(batch, length)[in_block].float()  # (K,)
        uniform = draw_per_row("uniform", counts, 1, generators, probs.device).squeeze(-1)
        commit = torch.zeros_like(in_block)
        commit[in_block] = uniform < ancestral_reveal_probability(row_steps_left, row_steps_left - 1)
        return commit
    uniform = None
    if rule == "random":
        uniform = draw_per_row("uniform", counts, 1, generators, probs.device).squeeze(-1)
    scores = torch.full(in_block.shape, float("-inf"), device=in_block.device)
    scores[in_block] = confidence_scores(rule, probs, tokens, uniform)
    to_commit = num_tokens_to_commit(remaining, steps_left.clamp(min=1))  # rows without masks: 0
    sure = torch.zeros_like(in_block)
    if confidence_threshold is not None:
        sure[in_block] = probs.gather(-1, tokens[:, None]).squeeze(-1) >= confidence_threshold
    others = (to_commit - sure.sum(dim=-1)).clamp(min=0)
    return sure | select_top(scores.masked_fill(sure, float("-inf")), others)
