"""Conditional likelihood of a masked diffusion LM: the negative ELBO of some tokens of a sequence (a continuation)
given the others (a prompt), which are never noised.

Only the scored tokens are masked; the prompt stays clean at every diffusion time. For a full-sequence model the bound
is
    -log p(c | x_prompt) <= NELBO(c | x_prompt) = integral_0^1 (1/t) E[ sum_{i masked} -log p(c^i | x_t) ] dt,
and on a block diffusion model (`config.block_size`) it is the block-factorised bound sum_b NELBO(c_b | x_b's prompt
tokens, x_<b), each block's scored tokens noised beside the clean blocks before them (the training pass's two streams).

Three estimators of the same bound, each with `num_samples` forward passes and a seed:
- "time_grid": the times (k + 1/2) / K of `diffusion.elbo_times`, each with masks drawn from the seed (the estimator of
  `negative_elbo`: with no prompt, a sequence scores what `compute_elbo` gives it alone);
- "time_stratified": the times (u + k) / K of one uniform offset u (stratified Monte Carlo), mapped to
  [sampling_eps, 1) as in training so that the weight 1/t stays bounded;
- "count_stratified": the number of masked tokens instead of the time (LLaDA's estimator): for n scored tokens,
  NELBO = sum_{m=1}^{n} (1/m) E[ sum over m masked tokens of -log p ], since integral_0^1 (1/t) C(n, m) t^m
  (1 - t)^(n - m) dt = 1/m; so m = 1 + floor(n ((u + k) / K mod 1)) is drawn stratified over {1..n}, exactly m
  scored tokens are masked, at random, and each counts n / m. A single scored token is then scored exactly, -log p of
  it masked beside the clean prompt, with no variance at all. On a block model each block's scored tokens draw their
  own counts.
`benchmarks/results/conditional_elbo_variance.md` measures the three on the shipped model: with 16 samples the count
estimator's estimate of a line of held-out code moves 6.1% (relative standard deviation over seeds) against 13.0% on
the time grid and 15.4% with stratified times (32 tokens: 5.7%, 6.2%, 11.9%; one token: 0, 58%, 35%), so it is the
default, with 16 samples.

Every row draws from its own generator seeded with `seed`, over its own real tokens in order, so a row scores the
same alone as in any batch, whatever the padding (and candidates of equal length share their masks, which makes their
comparison less noisy than two independent draws).
"""

import math
from typing import NamedTuple, Optional

import torch

from .diffusion import elbo_times, loss_weight, token_nll

__all__ = [
    "DEFAULT_ESTIMATOR",
    "DEFAULT_NUM_SAMPLES",
    "ESTIMATORS",
    "ConditionalNegativeELBO",
    "conditional_negative_elbo",
    "greedy_reproduces",
    "row_masks",
    "scored_mask",
]

ESTIMATORS = ("time_grid", "time_stratified", "count_stratified")
# Set by benchmarks/results/conditional_elbo_variance.md: the estimator with the least variance on the shipped model, at
# a number of samples where it moves about 6% from seed to seed on a line of code.
DEFAULT_ESTIMATOR = "count_stratified"
DEFAULT_NUM_SAMPLES = 16


class ConditionalNegativeELBO(NamedTuple):
    """The negative ELBO of each row's scored tokens: `nats` and `bits` (B,) float32, `num_tokens` (B,) int64."""

    nats: torch.Tensor
    bits: torch.Tensor
    num_tokens: torch.Tensor


def scored_mask(input_ids: torch.Tensor, prompt_mask, attention_mask=None, block_size: Optional[int] = None):
    """(B, L) bool, True at the tokens to score: real (attention_mask 1) and not prompt. Checks the arguments: shapes,
    and on a block model (`block_size`) rows padded at their end only and no prompt token in a block after the first
    scored token's."""
    if not isinstance(prompt_mask, torch.Tensor) or tuple(prompt_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"prompt_mask must be a tensor of the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(getattr(prompt_mask, 'shape', ()))}")
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if tuple(real.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(real.shape)}")
    prompt, real = prompt_mask.bool().cpu(), real.cpu()
    scored = real & ~prompt
    if block_size is not None:
        if bool((real[:, 1:] & ~real[:, :-1]).any()):
            raise ValueError("attention_mask: a block diffusion model's rows must be padded at their end (right "
                             "padding), so that their blocks start where they would alone")
        first_scored = torch.where(scored, torch.arange(scored.shape[1]), scored.shape[1]).amin(-1, keepdim=True)
        later_block = torch.arange(scored.shape[1]) // block_size > first_scored // block_size  # (B, L)
        if bool((prompt & real & later_block).any()):
            raise ValueError("prompt_mask: on a block diffusion model no prompt token may lie in a block after the "
                             "first scored token's (a block never reads the blocks after it, so it cannot be "
                             "conditioned on them)")
    return scored


def _check_estimator(estimator: str, num_samples: int) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")


def row_masks(
    scored: torch.Tensor, num_samples: int, seed: int, estimator: str, sampling_eps: float = 1e-3,
    block_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row's masks and weights for each sample: scored (n,) bool over the row's real tokens in order (n of them,
    the row's padding left out). Returns (masked (K, n) bool, weights (K, n) float32: the ELBO weight of each masked
    token, 0 elsewhere). Drawn from a generator seeded with `seed`, so a row's draws depend on it alone."""
    _check_estimator(estimator, num_samples)
    generator = torch.Generator().manual_seed(seed)
    n, K = scored.shape[0], num_samples
    masked = torch.zeros(K, n, dtype=torch.bool)
    weights = torch.zeros(K, n)
    if estimator == "count_stratified":
        positions = torch.arange(n)
        units = scored[None] if block_size is None else [scored & (positions // block_size == b)
                                                         for b in range(-(-n // block_size))]
        for unit in units:
            where = unit.nonzero().flatten()
            if not len(where):
                continue
            offset = torch.rand(1, generator=generator)
            counts = 1 + ((offset + torch.arange(K) / K) % 1.0 * len(where)).long().clamp(max=len(where) - 1)  # (K,)
            for k, count in enumerate(counts.tolist()):
                chosen = where[torch.randperm(len(where), generator=generator)[:count]]
                masked[k, chosen] = True
                weights[k, chosen] = len(where) / count
        return masked, weights
    if estimator == "time_grid":
        times = elbo_times(K)
    else:
        offset = torch.rand(1, generator=generator)
        times = sampling_eps + (1.0 - sampling_eps) * ((offset + torch.arange(K) / K) % 1.0)
    for k, t in enumerate(times.tolist()):
        # One uniform per real token, the prompt's included: with no prompt these are negative_elbo's draws.
        masked[k] = (torch.rand(n, generator=generator) < t) & scored
        weights[k, masked[k]] = float(loss_weight(t))
    return masked, weights


@torch.no_grad()
def conditional_negative_elbo(
    model, input_ids: torch.Tensor, prompt_mask: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
    num_samples: int = DEFAULT_NUM_SAMPLES, seed: int = 0, estimator: str = DEFAULT_ESTIMATOR,
) -> ConditionalNegativeELBO:
    """The negative ELBO of each row's scored tokens (real, not prompt) given its prompt tokens, which are never
    noised: `num_samples` forward passes of the batch, masks and times of `estimator` (see the module's docstring).

    input_ids: (B, L); prompt_mask: (B, L), True at the prompt's tokens (clean context); attention_mask: (B, L), 0 at
    padding (either side; at the end of a row on a block model). The model runs in eval mode and is put back in its
    previous mode; the global RNG is untouched."""
    mask_token_id = model.config.mask_token_id
    if mask_token_id is None:
        raise ValueError("the config has no mask_token_id: set config.mask_token_id to compute the ELBO")
    _check_estimator(estimator, num_samples)
    block_size = getattr(model.config, "block_size", None)
    scored = scored_mask(input_ids, prompt_mask, attention_mask, block_size)  # (B, L) on the CPU
    real = torch.ones_like(scored) if attention_mask is None else attention_mask.bool().cpu()
    masked = torch.zeros((num_samples, *scored.shape), dtype=torch.bool)  # (K, B, L)
    weights = torch.zeros(masked.shape)
    for row in range(scored.shape[0]):
        columns = real[row].nonzero().flatten()  # the row's real tokens, in order
        row_masked, row_weights = row_masks(scored[row, columns], num_samples, seed, estimator,
                                            model.config.sampling_eps, block_size)
        masked[:, row, columns], weights[:, row, columns] = row_masked, row_weights
    device = input_ids.device
    was_training = model.training
    model.eval()
    nats = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=device)
    try:
        for k in range(num_samples):
            sample_masked = masked[k].to(device)
            labels = input_ids.masked_fill(~sample_masked, -100)
            # A block model reads each noised block beside the clean blocks before it, which the labels give.
            logits = model(input_ids=input_ids.masked_fill(sample_masked, mask_token_id), attention_mask=attention_mask,
                           **({"labels": labels} if block_size is not None else {})).logits  # (B, L, V)
            nats += (token_nll(logits, labels, mask_token_id) * weights[k].to(device)).sum(-1)
    finally:
        model.train(was_training)
    nats = nats / num_samples
    return ConditionalNegativeELBO(nats=nats, bits=nats / math.log(2), num_tokens=scored.sum(-1).to(device))


@torch.no_grad()
def greedy_reproduces(
    model, input_ids: torch.Tensor, prompt_mask: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """(B,) bool: whether greedy decoding of the masked scored tokens, one token per step with the most confident
    first (low-confidence remasking; block by block on a block model), gives exactly those tokens. A row stops at its
    first step whose most confident token is not the scored one, so a wrong continuation costs one pass; each pass runs
    the rows still decoding only."""
    mask_token_id = model.config.mask_token_id
    block_size = getattr(model.config, "block_size", None)
    pending = scored_mask(input_ids, prompt_mask, attention_mask, block_size).to(input_ids.device)  # (B, L)
    canvas = input_ids.masked_fill(pending, mask_token_id)
    reproduces = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    was_training = model.training
    model.eval()
    try:
        while True:
            rows = (pending.any(-1) & reproduces).nonzero().flatten()  # the rows still decoding, alone in the pass
            if not len(rows):
                break
            logits = model(input_ids=canvas[rows], attention_mask=None if attention_mask is None else
                           attention_mask[rows]).logits.float()  # (R, L, V)
            logits[..., mask_token_id] = float("-inf")
            confidence, prediction = logits.softmax(-1).max(-1)  # (R, L) each
            candidates = pending[rows]
            if block_size is not None:  # the first block that still holds masks
                first = torch.where(candidates, positions, input_ids.shape[1]).amin(-1, keepdim=True) // block_size
                candidates = candidates & (positions // block_size == first)
            chosen = torch.where(candidates, confidence, -1.0).argmax(-1)  # (R,)
            right = prediction.gather(1, chosen[:, None])[:, 0] == input_ids[rows, chosen]
            reproduces[rows[~right]] = False
            canvas[rows[right], chosen[right]] = input_ids[rows[right], chosen[right]]
            pending[rows[right], chosen[right]] = False
    finally:
        model.train(was_training)
    return reproduces
