"""Masked diffusion math (MDLM / LLaDA): small pure functions on tensors.

Forward process, log-linear schedule: sigma(t) = -log(1 - t), so a token keeps its value with probability
alpha_t = exp(-sigma(t)) = 1 - t and is replaced by [MASK] with probability 1 - alpha_t = t. The continuous-time
negative ELBO is
    NELBO(x) = integral_0^1 -alpha'_t / (1 - alpha_t) * E_{x_t ~ q(.|x, t)} [ sum_{i masked} -log p(x^i | x_t) ] dt,
with the weight -alpha'_t / (1 - alpha_t) = 1/t. Training samples t per sequence; evaluation integrates over a fixed
grid of t so that its result is repeatable.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "INTEGER_DTYPES",
    "bits_per_token",
    "elbo_times",
    "labelled_positions",
    "loss_weight",
    "mask_probability",
    "masked_diffusion_loss",
    "negative_elbo",
    "noise_tokens",
    "perplexity_bound",
    "sample_times",
    "token_nll",
    "values_readable",
]


def sample_times(
    batch_size: int, sampling_eps: float = 1e-3, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Diffusion times for a batch, stratified (MDLM's antithetic sampling): one uniform offset u shared by the batch,
    t_i = (u + i / B) mod 1, so that exactly one time falls in each of the B strata of [0, 1); then mapped to
    [sampling_eps, 1) so that the 1/t weight stays bounded. Returns (B,) float32 on the CPU."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 < sampling_eps < 1:
        raise ValueError(f"sampling_eps must be in (0, 1), got {sampling_eps}")
    offset = torch.rand(1, generator=generator)
    u = (offset + torch.arange(batch_size) / batch_size) % 1.0  # (B,)
    return sampling_eps + (1.0 - sampling_eps) * u


def mask_probability(t: torch.Tensor) -> torch.Tensor:
    """Probability 1 - alpha_t that a token is masked at time t under the log-linear schedule (alpha_t = 1 - t)."""
    return t


def loss_weight(t: torch.Tensor) -> torch.Tensor:
    """The ELBO weight -alpha'_t / (1 - alpha_t) of the log-linear schedule: 1/t."""
    return 1.0 / t


def noise_tokens(
    input_ids: torch.Tensor,
    t: torch.Tensor,
    mask_token_id: int,
    noisable: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw x_t ~ q(x_t | x_0): each noisable token is independently replaced by `mask_token_id` with probability
    `mask_probability(t)` of its sequence (or, for block diffusion, of its block).

    input_ids: (B, L); t: (B,), or (B, L) a time per position; noisable: (B, L) bool, False where a token is never
    masked (padding, an SFT prompt). The uniforms are drawn on the CPU (from `generator` when given) so that a seed
    gives the same masks on every device. Returns (noised input_ids (B, L), masked (B, L) bool)."""
    if t.shape not in (input_ids.shape[:1], input_ids.shape):
        raise ValueError(f"t must have shape (batch,) = {tuple(input_ids.shape[:1])} or that of input_ids "
                         f"{tuple(input_ids.shape)}, got {tuple(t.shape)}")
    uniforms = torch.rand(input_ids.shape, generator=generator).to(input_ids.device)  # (B, L)
    probability = mask_probability(t).to(input_ids.device)
    masked = uniforms < (probability if t.dim() == 2 else probability[:, None])
    if noisable is not None:
        masked &= noisable.bool()
    return input_ids.masked_fill(masked, mask_token_id), masked


def token_nll(logits: torch.Tensor, labels: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """-log p(label) at each labelled position, with the mask token's logit excluded (SUBS parameterisation: a clean
    token is never [MASK]). logits: (..., V); labels: (...), -100 where nothing is predicted. Returns (...) float32, 0
    at unlabelled positions."""
    # One float32 copy to write the mask token's -inf into: the cast's own where the logits are not float32 already.
    logits = logits.float() if logits.dtype != torch.float32 else logits.clone()
    logits[..., mask_token_id] = float("-inf")
    # `ignore_index` gives 0 at unlabelled positions without forming their -log p: a placeholder target there could be
    # the mask token itself (mask_token_id 0), whose -log p is inf, and inf * 0 is NaN.
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(), ignore_index=-100, reduction="none"
    ).view(labels.shape)


INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def values_readable(tensor: torch.Tensor) -> bool:
    """Whether checks that read `tensor`'s values back to the host may run: not under `torch.compile`, nor while a CUDA
    graph is captured (`diffuapriel_hf.modeling.cuda_graphs`), which cannot wait for the device."""
    return not torch.compiler.is_compiling() and not (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


def check_label_shape(labels: torch.Tensor, shape) -> None:
    if labels.shape != shape:
        raise ValueError(f"labels must have shape {tuple(shape)}, got {tuple(labels.shape)}")


def labelled_positions(labels: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of the positions that have a label (labels != -100), in row-major order: the only positions
    whose logits a training step needs. labels (B, L) must have `shape` (that of the hidden states). Reads the labels'
    values: a host synchronisation on CUDA."""
    check_label_shape(labels, shape)
    return (labels != -100).nonzero(as_tuple=True)


def masked_diffusion_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_weights: Optional[torch.Tensor],
    mask_token_id: Optional[int],
    positions: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    nll_function=token_nll,
) -> torch.Tensor:
    """The MDLM objective, normalised per counted token.

    logits: (B, L, V), or with `positions` (the `labelled_positions` of labels) (N, V) the logits of those N positions
    alone, in their order; labels: (B, L), -100 where nothing is predicted; loss_weights: (B, L), the weight 1/t of
    every position that counts (masked or not), 0 elsewhere. Returns sum(weight * CE over labelled positions) / number
    of counted positions. Without weights: the mean cross-entropy over the labelled positions. The mask token's logit
    is excluded (SUBS parameterisation: a clean token is never [MASK]). `nll_function` computes -log p(label):
    `token_nll`, or a function of its signature (`KernelPolicy.token_nll`).
    """
    if mask_token_id is None:
        raise ValueError("the config has no mask_token_id: set config.mask_token_id to compute the diffusion loss")
    if positions is None:
        check_label_shape(labels, logits.shape[:2])
    elif logits.shape[:-1] != positions[0].shape:
        raise ValueError(f"logits must hold one row for each of the {positions[0].numel()} labelled positions, got "
                         f"{tuple(logits.shape)}")
    if labels.dtype not in INTEGER_DTYPES:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    vocab_size = logits.shape[-1]
    labelled = labels != -100
    if values_readable(labels) and bool(
        (labelled & ((labels < 0) | (labels >= vocab_size) | (labels == mask_token_id))).any()
    ):
        raise ValueError(
            f"labels must be -100 (not predicted) or a token id in [0, {vocab_size}) other than the mask token "
            f"{mask_token_id}"
        )
    nll = nll_function(logits, labels if positions is None else labels[positions], mask_token_id)  # (B, L) or (N,)
    if loss_weights is None:
        return nll.sum() / labelled.sum().clamp(min=1)
    if loss_weights.shape != labels.shape:
        raise ValueError(
            f"loss_weights must have the shape of labels {tuple(labels.shape)}, got {tuple(loss_weights.shape)}"
        )
    counted = (loss_weights > 0).sum().clamp(min=1)
    weights = loss_weights if positions is None else loss_weights[positions]
    return (nll * weights.float()).sum() / counted


def elbo_times(num_samples: int) -> torch.Tensor:
    """The fixed grid of diffusion times of the ELBO evaluation: the midpoints (k + 1/2) / K of K equal strata of
    (0, 1), the midpoint rule for the integral over t. Returns (K,) float32."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    return (torch.arange(num_samples, dtype=torch.float32) + 0.5) / num_samples


@torch.no_grad()
def negative_elbo(
    model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, num_samples: int = 16, seed: int = 0
) -> torch.Tensor:
    """The negative ELBO of each sequence in nats, an upper bound on -log p(x): the integral over t estimated on the
    grid `elbo_times(num_samples)`, each time with its own masks drawn from a private generator seeded with `seed`
    (the global RNG is untouched), so that two calls on the same inputs agree exactly.

    On a block diffusion model (`config.block_size`) this is the block-factorised bound sum_b NELBO(x_b | x_<b), each
    block noised at each grid time and read beside the clean blocks before it.

    input_ids: (B, L); attention_mask: (B, L), 0 at padding (never masked, never counted). The model runs in eval
    mode (dropout off) and is put back in its previous mode. Returns (B,) float32."""
    mask_token_id = model.config.mask_token_id
    if mask_token_id is None:
        raise ValueError("the config has no mask_token_id: set config.mask_token_id to compute the ELBO")
    noisable = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    nelbo = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)  # (B,)
    try:
        for t in elbo_times(num_samples).tolist():
            times = torch.full(input_ids.shape[:1], t)  # (B,)
            noised, masked = noise_tokens(input_ids, times, mask_token_id, noisable, generator)
            labels = input_ids.masked_fill(~masked, -100)
            # A block model reads each noised block beside the clean blocks before it, which the labels give: its
            # bound is the block-factorised one, sum_b NELBO(x_b | x_<b).
            block_model = getattr(model.config, "block_size", None) is not None
            logits = model(input_ids=noised, attention_mask=attention_mask,
                           **({"labels": labels} if block_model else {})).logits  # (B, L, V)
            nelbo += loss_weight(t) * token_nll(logits, labels, mask_token_id).sum(-1)
    finally:
        model.train(was_training)
    return nelbo / num_samples


def bits_per_token(nats, num_tokens) -> float:
    """A negative ELBO (nats, summed over sequences) as bits per token: an upper bound on the model's true bits per
    token. `nats` and `num_tokens` may be tensors (they are summed) or numbers."""
    nats, num_tokens = float(torch.as_tensor(nats).sum()), float(torch.as_tensor(num_tokens).sum())
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    return nats / num_tokens / math.log(2)


def perplexity_bound(nats, num_tokens) -> float:
    """exp(negative ELBO per token): an upper bound on the model's perplexity."""
    return 2.0 ** bits_per_token(nats, num_tokens)
