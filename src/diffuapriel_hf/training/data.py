"""Batches for masked diffusion training with `transformers.Trainer`."""

from typing import Any, Optional

import numpy as np
import torch

from ..modeling.block_diffusion import num_blocks, sample_block_times
from ..modeling.diffusion import loss_weight, noise_tokens, sample_times

__all__ = ["DataCollatorForMaskedDiffusion", "NoiseSeededDataset", "document_stream"]


def document_stream(tokenizer, texts, names=None) -> list[int]:
    """Tokenize the documents, end each with eos, and join them into one stream of token ids.

    Text that spells a special token (`<|mask|>`, `<|endoftext|>`, ...) is tokenized as text, never as that token
    (`split_special_tokens`). A document that still gives the mask token's id (a tokenizer whose ordinary vocabulary
    holds it) is refused here, naming the document (`names[i]`, else its index) and the line and column: as a label
    the mask token would stop training at whichever later step drew it."""
    texts = list(texts)
    encoded = tokenizer(
        texts, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=tokenizer.is_fast
    )
    stream = []
    for i, ids in enumerate(encoded["input_ids"]):
        if tokenizer.mask_token_id in ids:
            position = ids.index(tokenizer.mask_token_id)
            name = names[i] if names is not None else f"document {i}"
            raise ValueError(f"{name}: {text_position(texts[i], encoded, i, position)} tokenizes to the mask token "
                             f"{tokenizer.mask_token!r} (id {tokenizer.mask_token_id}), which cannot be a training "
                             "label; remove that text or use a tokenizer whose mask token no text spells")
        stream.extend(ids + [tokenizer.eos_token_id])
    return stream


def text_position(text: str, encoded, document: int, token: int) -> str:
    """Where the `token`-th token of a document starts: line and column when the tokenizer gives character offsets."""
    if "offset_mapping" not in encoded:
        return f"token {token}"
    start = encoded["offset_mapping"][document][token][0]
    line, column = text.count("\n", 0, start) + 1, start - (text.rfind("\n", 0, start) + 1) + 1
    return f"line {line}, column {column}"


class DataCollatorForMaskedDiffusion:
    """Pads tokenized examples and noises them for the MDLM objective.

    Each example is a dict with `input_ids` and optionally `attention_mask` and `labels` (-100 marks tokens that are
    never masked and never counted: an SFT prompt), both as long as `input_ids`. The collator samples a diffusion time
    t per sequence, stratified across the batch (`diffusion.sample_times`, t >= `sampling_eps`), masks every real,
    non-prompt token with probability t and returns:
        input_ids       (B, L) the noised tokens
        attention_mask  (B, L) 1 at real tokens, 0 at padding; left out when no example is padded (see `unpadded`)
        labels          (B, L) the clean token where masked, -100 elsewhere
        loss_weights    (B, L) 1/t at every real non-prompt token (masked or not), 0 elsewhere

    Examples that carry `labels` and `loss_weights` are already noised (`training.evaluation.ELBOEvaluationSet`): they
    are padded (labels with -100, weights with 0), or packed with `padding_free`, and nothing is drawn, so an evaluation
    over them is repeatable.

    An example may fix its masks with an int `noise_seed` and its time with a float `t`. When every example of a batch
    has a seed, the batch's times come from a generator seeded with all of them, so the batch's noise is a pure
    function of its examples: `NoiseSeededDataset` gives training examples such seeds, which makes a run resumed from
    a checkpoint draw the noise of the uninterrupted run (whatever the dataloader workers or gradient accumulation).
    Without seeds the noise comes from torch's global RNG.

    With `padding_free=True` the noised examples are packed into one row with no padding (transformers'
    `DataCollatorWithFlattening` layout): input_ids, labels and loss_weights (1, T) for the T tokens of the batch,
    and, instead of attention_mask, `position_ids` (restarting at 0 in each example) and `seq_idx` (each token's
    example), with which the model keeps the examples apart in both directions. The loss is the padded batch's.
    """

    def __init__(self, tokenizer, sampling_eps: float = 1e-3, pad_to_multiple_of: Optional[int] = None,
                 block_size: Optional[int] = None, padding_free: bool = False):
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
        if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                       or block_size < 1):
            raise ValueError(f"block_size must be a positive integer (the model's config.block_size) or None, got "
                             f"{block_size!r}")
        if not isinstance(padding_free, bool):
            raise ValueError(f"padding_free must be a bool, got {padding_free!r}")
        if padding_free and (block_size is not None or pad_to_multiple_of is not None):
            raise ValueError("padding_free packs the examples into one row without padding: it does not go with "
                             "block_size (a block model's blocks count from a row's start) or pad_to_multiple_of")
        self.padding_free = padding_free
        self.tokenizer = tokenizer
        self.mask_token_id = tokenizer.mask_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self.padding_side = getattr(tokenizer, "padding_side", "right")
        self.sampling_eps = sampling_eps
        self.pad_to_multiple_of = pad_to_multiple_of
        self.block_size = block_size

    def _pad(self, rows: list, length: int, value, dtype=torch.long) -> torch.Tensor:
        padded = torch.full((len(rows), length), value, dtype=dtype)
        for i, row in enumerate(rows):
            row = torch.as_tensor(row, dtype=dtype)
            if self.padding_side == "left":
                padded[i, length - len(row):] = row
            else:
                padded[i, : len(row)] = row
        return padded

    def _padded(self, examples: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, noisable), each (B, L): the examples padded, and where noise may fall."""
        for i, example in enumerate(examples):
            for key in ("attention_mask", "labels"):
                if key in example and len(example[key]) != len(example["input_ids"]):
                    raise ValueError(
                        f"example {i} has {len(example[key])} {key} for {len(example['input_ids'])} input_ids: give "
                        f"one {key} entry per token"
                    )
        length = max(len(example["input_ids"]) for example in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = self._pad([example["input_ids"] for example in examples], length, self.pad_token_id)
        attention_mask = self._pad(
            [example.get("attention_mask", [1] * len(example["input_ids"])) for example in examples], length, 0
        )
        noisable = attention_mask.bool()
        if any("labels" in example for example in examples):
            # Dataset labels only say which tokens take part (-100: a prompt); the targets are the clean tokens.
            given = self._pad([example.get("labels", example["input_ids"]) for example in examples], length, -100)
            noisable &= given != -100
        return input_ids, attention_mask, noisable

    def _times(self, examples: list[dict[str, Any]], seeds: list, length: int) -> torch.Tensor:
        """Diffusion times: (B,), or with `block_size` (B, L), one time per block repeated over its positions; each
        example's own `t` for its whole row, the others stratified over the batch (over all its blocks)."""
        generator = None
        if all(seed is not None for seed in seeds):
            generator = torch.Generator().manual_seed(combine_seeds(seeds))
        if self.block_size is None:
            t = sample_times(len(examples), self.sampling_eps, generator)  # (B,)
        else:
            blocks = sample_block_times(len(examples), num_blocks(length, self.block_size), self.sampling_eps,
                                        generator)  # (B, n)
            t = blocks.repeat_interleave(self.block_size, dim=1)[:, :length]  # (B, L)
        for i, example in enumerate(examples):
            if example.get("t") is not None:
                t[i] = float(example["t"])
                if not 0 < t[i] <= 1:
                    raise ValueError(f"example {i} has t={example['t']}, outside (0, 1]")
        return t

    def _padded_noised(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """A batch of examples noised beforehand, padded as they are."""
        if not all("labels" in example and "loss_weights" in example for example in examples):
            raise ValueError("some examples carry loss_weights (noised beforehand) and others do not, or lack their "
                             "labels: a batch is either noised here or noised beforehand, with labels and loss_weights")
        length = max(len(example["input_ids"]) for example in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": self._pad([e["input_ids"] for e in examples], length, self.pad_token_id),
                 "attention_mask": self._pad([e.get("attention_mask", [1] * len(e["input_ids"])) for e in examples],
                                             length, 0),
                 "labels": self._pad([e["labels"] for e in examples], length, -100),
                 "loss_weights": self._pad([e["loss_weights"] for e in examples], length, 0.0, torch.float32)}
        return batch

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("examples is empty")
        if any("loss_weights" in example for example in examples):
            batch = self._padded_noised(examples)
            return packed(batch) if self.padding_free else unpadded(batch)
        input_ids, attention_mask, noisable = self._padded(examples)  # (B, L) each
        seeds = [example.get("noise_seed") for example in examples]
        t = self._times(examples, seeds, input_ids.shape[1])  # (B,) or (B, L)
        noised, masked = input_ids.clone(), torch.zeros_like(noisable)
        for i, seed in enumerate(seeds):
            if seed is not None:
                generator = torch.Generator().manual_seed(int(seed))
                noised[i : i + 1], masked[i : i + 1] = noise_tokens(
                    input_ids[i : i + 1], t[i : i + 1], self.mask_token_id, noisable[i : i + 1], generator
                )
        unseeded = [i for i, seed in enumerate(seeds) if seed is None]
        if unseeded:
            noised[unseeded], masked[unseeded] = noise_tokens(
                input_ids[unseeded], t[unseeded], self.mask_token_id, noisable[unseeded]
            )
        batch = {
            "input_ids": noised,
            "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(~masked, -100),
            "loss_weights": (loss_weight(t) if t.dim() == 2 else loss_weight(t)[:, None]) * noisable,  # (B, L)
        }
        return packed(batch) if self.padding_free else unpadded(batch)


def unpadded(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without its attention mask where the mask is all ones. The collator can tell for free (its tensors
    are on the CPU); the model on CUDA cannot without waiting for the device, so it takes the padding path for any
    mask it is given: on an H100 a training step given a mask of ones took 1.04x diffuapriel-1.3b's time without one
    and 1.16x diffutran-1.3b's (benchmarks/results/training_throughput_no_checkpointing.json)."""
    if bool(batch["attention_mask"].all()):
        del batch["attention_mask"]
    return batch


def packed(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A padded batch (B, L) as one row (1, T) of its T real tokens, with `position_ids` and `seq_idx` in place of its
    attention_mask."""
    real = batch.pop("attention_mask").bool()
    rows = {name: tensor[real][None] for name, tensor in batch.items()}
    rows["position_ids"] = (real.long().cumsum(-1) - 1)[real][None]
    rows["seq_idx"] = torch.arange(real.shape[0], dtype=torch.int32)[:, None].expand_as(real)[real][None]
    return rows


def combine_seeds(seeds) -> int:
    """One 64-bit seed from a sequence of non-negative integers, well mixed (numpy's `SeedSequence`)."""
    return int(np.random.SeedSequence([int(seed) for seed in seeds]).generate_state(1, np.uint64)[0])


class NoiseSeededDataset(torch.utils.data.Dataset):
    """A map-style dataset whose examples carry a `noise_seed` that is a pure function of (seed, epoch, index), for
    `DataCollatorForMaskedDiffusion`: a batch's noise then depends only on which examples it holds and the epoch, not
    on how many batches were drawn before, in which process or dataloader worker. `Trainer` (through accelerate's
    dataloader) calls `set_epoch` before each epoch; with `dataloader_persistent_workers` the workers would keep the
    first epoch's copy, so that option is refused by the train command."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], "noise_seed": combine_seeds((self.seed, self.epoch, index))}
