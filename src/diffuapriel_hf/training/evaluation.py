"""Held-out evaluation of a masked diffusion LM on raw text: the negative ELBO as bits per token, and for code, the
share of generated completions that parse as Python."""

import ast
import warnings
from typing import Iterable

import torch

from .data import document_stream
from ..modeling.diffusion import bits_per_token, negative_elbo

__all__ = [
    "CODE_PROMPTS", "complete_lines", "completion_parse_rate", "parses", "text_bits_per_token", "token_sequences",
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
