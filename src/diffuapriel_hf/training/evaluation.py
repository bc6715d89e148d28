"""Held-out evaluation of a masked diffusion LM: the negative ELBO as bits per token, of raw text
(`text_bits_per_token`) and during `Trainer` evaluation (`ELBOEvaluationSet`, `ELBOMetricsCallback`), and for code, the
share of generated completions that parse as Python."""

import ast
import math
import warnings
from typing import Iterable

import torch
from transformers import TrainerCallback

from .data import document_stream
from ..modeling.diffusion import bits_per_token, elbo_times, loss_weight, negative_elbo, noise_tokens

__all__ = [
    "CODE_PROMPTS", "ELBOEvaluationSet", "ELBOMetricsCallback", "complete_lines", "completion_parse_rate", "parses",
    "text_bits_per_token", "token_sequences",
]

# Function headers after which a code model's completions are checked to parse (tests/test_default_model.py).
CODE_PROMPTS = (
    "def fibonacci(n):", "def is_even(number):", "def read_lines(path):", "class Point:\n    def __init__(self, x, y):",
    "def add(a, b):", "def main():", "def clamp(value, low, high):", "def count_words(text):",
)


def token_sequences(tokenizer, texts: Iterable[str], seq_len: int) -> list[list[int]]:
    """Tokenize the documents, end each with eos, join them and cut the stream into sequences of `seq_len` tokens;
    the last sequence keeps the remainder, so that every token is counted exactly once."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token to end documents with")
    stream = document_stream(tokenizer, texts)
    if not stream:
        raise ValueError("no text to evaluate")
    return [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]


@torch.no_grad()
def text_bits_per_token(
    model, tokenizer, texts: Iterable[str], seq_len: int = 512, num_samples: int = 16, batch_size: int = 8,
    seed: int = 0,
) -> dict:
    """The negative ELBO of `texts` in bits per token (an upper bound on the model's true bits per token), on the
    fixed time grid and masking seed of `negative_elbo`, so that the same model and text always give the same value.

    Returns {"bits_per_token", "nats", "tokens", "sequences"}."""
    sequences = token_sequences(tokenizer, texts, seq_len)
    device = next(model.parameters()).device
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else tokenizer.eos_token_id
    total_nats, total_tokens = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        nats = negative_elbo(
            model, input_ids.to(device), attention_mask.to(device), num_samples=num_samples, seed=seed + start
        )
        total_nats += float(nats.sum())
        total_tokens += int(attention_mask.sum())
    return dict(
        bits_per_token=bits_per_token(total_nats, total_tokens), nats=total_nats, tokens=total_tokens,
        sequences=len(sequences),
    )


def complete_lines(text: str) -> str:
    """The text without its last line, which the token budget may have cut short (a one-line text is kept whole)."""
    lines = text.split("\n")
    return "\n".join(lines[:-1]) if len(lines) > 1 else text


def parses(source: str) -> bool:
    with warnings.catch_warnings():  # generated code may hold what Python only warns about ("1if", "\\d")
        warnings.simplefilter("ignore", SyntaxWarning)
        try:
            ast.parse(source)
        except SyntaxError:
            return False
    return True


@torch.no_grad()
def completion_parse_rate(model, tokenizer, prompts: Iterable[str], **generate_kwargs) -> dict:
    """How many of the completions that `model.generate(prompt ids, **generate_kwargs)` writes after `prompts` (each a
    code prefix, a function header say) parse as Python with their prompt, once the last line is dropped
    (`complete_lines`). Each prompt is generated on its own: padding in a batch would move a block model's blocks.

    Returns {"parsed", "prompts", "parse_rate", "texts"} (texts: each prompt with its decoded completion)."""
    texts = []
    device = next(model.parameters()).device
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        texts.append(tokenizer.decode(model.generate(ids, **generate_kwargs)[0], skip_special_tokens=True))
    if not texts:
        raise ValueError("no prompts to complete")
    parsed = sum(parses(complete_lines(text)) for text in texts)
    return dict(parsed=parsed, prompts=len(texts), parse_rate=parsed / len(texts), texts=texts)


class ELBOEvaluationSet(torch.utils.data.Dataset):
    """A `Trainer` evaluation set whose `eval_loss` is the negative ELBO per token, the same at every evaluation of the
    same weights: each sequence once per time of the fixed grid `elbo_times(num_samples)`, noised beforehand with the
    masks `negative_elbo` draws for it alone (seed `seed + i` for the i-th sequence), as examples of `input_ids`,
    `attention_mask`, `labels` and `loss_weights` (1/t at every token). `DataCollatorForMaskedDiffusion` pads such
    examples without drawing anything, and every column is an argument of the model's forward, so `Trainer`'s default
    `remove_unused_columns=True` and `label_names` keep them. The sequences share one length: then every example counts
    the same tokens and the mean of the batches' losses is exactly the mean over tokens. `ELBOMetricsCallback` adds
    the loss in bits per token and the perplexity bound. On a block model the labels make the model read each block
    beside the clean blocks before it: the block-factorised bound."""

    def __init__(self, sequences, mask_token_id: int, num_samples: int = 8, seed: int = 0):
        sequences = [list(sequence) for sequence in sequences]
        if not sequences or len({len(sequence) for sequence in sequences}) != 1 or not sequences[0]:
            raise ValueError("sequences must be non-empty and of one length, so that every example counts the same "
                             "tokens (cut held-out text into sequences of one length, as `diffuapriel train` does)")
        times = elbo_times(num_samples).tolist()
        self.examples = []
        for index, sequence in enumerate(sequences):
            ids = torch.tensor([sequence])
            generator = torch.Generator().manual_seed(seed + index)
            for t in times:  # negative_elbo's draws for this sequence alone
                noised, masked = noise_tokens(ids, torch.full((1,), t), mask_token_id, generator=generator)
                self.examples.append({
                    "input_ids": noised[0].tolist(), "attention_mask": [1] * len(sequence),
                    "labels": ids.masked_fill(~masked, -100)[0].tolist(),
                    "loss_weights": [float(loss_weight(t))] * len(sequence),
                })

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


class ELBOMetricsCallback(TrainerCallback):
    """Adds to every evaluation's metrics, for each `<prefix>_loss` (nats per token: the negative ELBO per token on an
    `ELBOEvaluationSet`), `<prefix>_bits_per_token` and `<prefix>_perplexity_bound`, in the metrics `evaluate()`
    returns and in the log entry of that evaluation (`trainer.state.log_history`, which checkpoints save)."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics:
            return
        added = {}
        for key, loss in metrics.items():
            if key.endswith("_loss") and isinstance(loss, (int, float)):
                prefix = key[: -len("_loss")]
                added[f"{prefix}_bits_per_token"] = loss / math.log(2)
                added[f"{prefix}_perplexity_bound"] = math.exp(loss)
        metrics.update(added)
        if state.log_history and all(state.log_history[-1].get(key) == metrics[key] for key in metrics
                                     if key.endswith("_loss")):
            state.log_history[-1].update(added)
