"""Masked diffusion math (MDLM / LLaDA): small pure functions on tensors."""

from typing import Optional

import torch
import torch.nn.functional as F


def masked_diffusion_loss(
    logits: torch.Tensor, labels: torch.Tensor, loss_weights: Optional[torch.Tensor], mask_token_id: Optional[int]
) -> torch.Tensor:
    """The MDLM objective, normalised per counted token.

    logits: (B, L, V); labels: (B, L), -100 where nothing is predicted; loss_weights: (B, L), the weight 1/t of every
    position that counts (masked or not), 0 elsewhere. Returns sum(weight * CE over labelled positions) / number of
    counted positions. Without weights: the mean cross-entropy over the labelled positions. The mask token's logit
    is excluded (SUBS parameterisation: a clean token is never [MASK]).
    """
    if mask_token_id is None:
        raise ValueError("the config has no mask_token_id: set config.mask_token_id to compute the diffusion loss")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    logits = logits.float().clone()
    logits[..., mask_token_id] = float("-inf")
    predicted = labels != -100
    token_loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).masked_fill(~predicted.reshape(-1), 0),
        reduction="none",
    ).view_as(labels) * predicted
    if loss_weights is None:
        return token_loss.sum() / predicted.sum().clamp(min=1)
    if loss_weights.shape != labels.shape:
        raise ValueError(f"loss_weights must have the shape of labels {tuple(labels.shape)}, got {tuple(loss_weights.shape)}")
    counted = (loss_weights > 0).sum().clamp(min=1)
    return (token_loss * loss_weights.float()).sum() / counted
