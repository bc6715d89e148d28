"""Batches for masked diffusion training with `transformers.Trainer`."""

from typing import Any, Optional

import torch

from ..modeling.diffusion import loss_weight, noise_tokens, sample_times


def document_stream(tokenizer, texts) -> list[int]:
    """Tokenize the documents, end each with eos, and join them into one stream of token ids."""
    stream = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream.extend(ids + [tokenizer.eos_token_id])
    return stream


class DataCollatorForMaskedDiffusion:
    """Pads tokenized examples and noises them for the MDLM objective.

    Each example is a dict with `input_ids` and optionally `attention_mask` and `labels` (-100 marks tokens that are
    never masked and never counted: an SFT prompt). The collator samples a diffusion time t per sequence, stratified
    across the batch (`diffusion.sample_times`, t >= `sampling_eps`), masks every real, non-prompt token with
    probability t and returns:
        input_ids       (B, L) the noised tokens
        attention_mask  (B, L) 1 at real tokens, 0 at padding
        labels          (B, L) the clean token where masked, -100 elsewhere
        loss_weights    (B, L) 1/t at every real non-prompt token (masked or not), 0 elsewhere

    An example may fix its own time with a float `t` and its masks with an int `noise_seed` (the ELBO evaluation
    set does, so that every evaluation sees the same noise). Without a seed the masks come from torch's global RNG,
    which `Trainer` seeds and restores on resume.
    """

    def __init__(self, tokenizer, sampling_eps: float = 1e-3, pad_to_multiple_of: Optional[int] = None):
        if getattr(tokenizer, "mask_token_id", None) is None:
            raise ValueError(
                "tokenizer has no mask token: add one, e.g. tokenizer.add_special_tokens({'mask_token': '<|mask|>'}), "
                "and make sure the model's vocab_size has room for it"
            )
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise ValueError("tokenizer has no pad token: set tokenizer.pad_token (e.g. to its eos token)")
        if not 0 < sampling_eps < 1:
            raise ValueError(f"sampling_eps must be in (0, 1), got {sampling_eps}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of}")
        self.tokenizer = tokenizer
        self.mask_token_id = tokenizer.mask_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self.padding_side = getattr(tokenizer, "padding_side", "right")
        self.sampling_eps = sampling_eps
        self.pad_to_multiple_of = pad_to_multiple_of

    def _pad(self, rows: list, length: int, value) -> torch.Tensor:
        padded = torch.full((len(rows), length), value, dtype=torch.long)
        for i, row in enumerate(rows):
            row = torch.as_tensor(row, dtype=torch.long)
            if self.padding_side == "left":
                padded[i, length - len(row):] = row
            else:
                padded[i, : len(row)] = row
        return padded

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("examples is empty")
        ids = [example["input_ids"] for example in examples]
        length = max(len(row) for row in ids)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = self._pad(ids, length, self.pad_token_id)  # (B, L)
        attention_mask = self._pad(
            [example.get("attention_mask", [1] * len(example["input_ids"])) for example in examples], length, 0
        )
        noisable = attention_mask.bool()  # (B, L)
        if any("labels" in example for example in examples):
            # Dataset labels only say which tokens take part (-100: a prompt); the targets are the clean tokens.
            given = self._pad([example.get("labels", example["input_ids"]) for example in examples], length, -100)
            noisable &= given != -100

        t = sample_times(len(examples), self.sampling_eps)  # (B,)
        noised, masked = input_ids.clone(), torch.zeros_like(noisable)
        unseeded = [i for i, example in enumerate(examples) if example.get("noise_seed") is None]
        for i, example in enumerate(examples):
            if example.get("t") is not None:
                t[i] = float(example["t"])
                if not 0 < t[i] <= 1:
                    raise ValueError(f"example {i} has t={example['t']}, outside (0, 1]")
            if example.get("noise_seed") is not None:
                generator = torch.Generator().manual_seed(int(example["noise_seed"]))
                noised[i : i + 1], masked[i : i + 1] = noise_tokens(
                    input_ids[i : i + 1], t[i : i + 1], self.mask_token_id, noisable[i : i + 1], generator
                )
        if unseeded:
            noised[unseeded], masked[unseeded] = noise_tokens(
                input_ids[unseeded], t[unseeded], self.mask_token_id, noisable[unseeded]
            )
        return {
            "input_ids": noised,
            "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(~masked, -100),
            "loss_weights": loss_weight(t)[:, None] * noisable,  # (B, L)
        }
