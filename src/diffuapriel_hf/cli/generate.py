"""`diffuapriel generate`: generate or infill text with a DiffuApriel model and print it.

    diffuapriel generate --prompt "def fibonacci(n):"        # the package's own model
    diffuapriel generate --model PATH --prompt "Once upon a time" --max-new-tokens 64
    echo "Once upon a time" | diffuapriel generate --model PATH
    diffuapriel generate --model PATH --infill "The [MASK] sat on the [MASK]." --infill-length 2

The model folder (or Hub id) must hold a tokenizer, or one is named with --tokenizer. Settings not given on the
command line come from the model's `generation_config.json`. The full text (prompt and generated tokens, special
tokens left out) goes to stdout; a progress bar of denoising steps goes to stderr.
"""

import argparse
import copy
import sys

from ..modeling.sampling import REMASKING_RULES

DEFAULT_MASK_PLACEHOLDER = "[MASK]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument(
        "--model", help="model folder saved with save_pretrained, or a Hub id (default: the package's own model, "
        "trained on the Python standard library)"
    )
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the model's)")
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--prompt", help="text to continue (default: read from stdin)")
    text.add_argument(
        "--infill", help="text with mask placeholders to fill in place; tokens after it only with --max-new-tokens"
    )
    parser.add_argument(
        "--mask-placeholder", default=DEFAULT_MASK_PLACEHOLDER,
        help=f"the placeholder in --infill text (default {DEFAULT_MASK_PLACEHOLDER!r})",
    )
    parser.add_argument("--infill-length", type=int, default=1, help="mask tokens per placeholder (default 1)")
    sampling = parser.add_argument_group("sampling (default: the model's generation config)")
    sampling.add_argument("--max-new-tokens", type=int, help="tokens to generate after the text")
    sampling.add_argument("--steps", type=int, help="denoising steps in all (default: one token per step)")
    sampling.add_argument("--block-length", type=int, help="tokens per semi-autoregressive block")
    sampling.add_argument("--remasking", choices=REMASKING_RULES, help="which masks to commit at each step")
    sampling.add_argument("--confidence-threshold", type=float, help="commit every token at least this likely")
    sampling.add_argument(
        "--block-cache", action="store_true",
        help="run each block's later steps on the block alone, reusing the rest's contribution (faster, approximate)",
    )
    sampling.add_argument("--temperature", type=float, help="sampling temperature; 0 picks the most likely token")
    sampling.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    sampling.add_argument("--top-p", type=float, help="sample within this much probability mass")
    sampling.add_argument("--seed", type=int, help="seed of the sampling (default: a fresh one)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
        help="weights' dtype (default: float32 on the CPU, as saved elsewhere)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


# The generation settings that flags set, as generate()'s errors name them (`steps`), and the flags.
FLAGS = {name: "--" + name.replace("_", "-") for name in (
    "max_new_tokens", "steps", "block_length", "remasking", "confidence_threshold", "temperature", "top_k", "top_p")}


def fail(message: str):
    raise SystemExit(f"diffuapriel generate: error: {message}")


def fail_with_flags(message: str):
    """`fail` with the settings that flags set named as the flags (`--steps`, not `steps`)."""
    for name, flag in FLAGS.items():
        message = message.replace(f"`{name}`", f"`{flag}`")
    fail(message)


def default_model_path() -> str:
    """The model shipped inside the package: an 8M-parameter DiffuApriel trained on the Python standard library
    (benchmarks/default_model/README.md)."""
    from importlib.resources import files

    return str(files("diffuapriel_hf") / "default_model")


def model_location(args) -> str:
    """Where the model comes from: --model, else the model shipped with the package."""
    return default_model_path() if args.model is None else args.model


def generation_settings(args) -> dict:
    """The sampling options given on the command line, as `generate()` keyword arguments."""
    names = ("max_new_tokens", "steps", "block_length", "remasking", "confidence_threshold", "top_k", "top_p")
    settings = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.temperature is not None:  # > 0 samples, 0 picks the most likely token
        settings["do_sample"] = args.temperature > 0
        if args.temperature != 0:
            settings["temperature"] = args.temperature
    if args.block_cache:
        settings["use_block_cache"] = True
    if args.infill is not None and args.max_new_tokens is None:
        settings["max_new_tokens"] = None  # fill the placeholders only, whatever the model's config says
    return settings


def infill_ids(tokenizer, text: str, placeholder: str, length: int, mask_token_id: int) -> list[int]:
    """Token ids of `text` with each `placeholder` replaced by `length` mask tokens. The pieces between
    placeholders are tokenized apart (so a placeholder never merges into a neighbouring token); the space before a
    placeholder is left to the tokens that fill it."""
    pieces = text.split(placeholder)
    if len(pieces) == 1:
        fail(f"--infill text has no {placeholder!r} placeholder (set another with --mask-placeholder)")
    ids = []
    for i, piece in enumerate(pieces):
        if i < len(pieces) - 1:
            piece = piece.rstrip(" ")
        ids += tokenizer(piece, add_special_tokens=False).input_ids
        if i < len(pieces) - 1:
            ids += [mask_token_id] * length
    prefix, suffix = special_tokens_around(tokenizer)
    return prefix + ids + suffix


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (e.g. BOS; CLS ... SEP), read off the encoding
    of a probe text with and without them."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False).input_ids
    full = tokenizer(probe).input_ids
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


class StepProgress:
    """A progress bar of denoising forward passes, fed by generate()'s `on_step` reports. Its total is an upper
    bound: a confidence threshold or the ancestral sampler may finish in fewer passes."""

    def __init__(self, total: int, disable: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="denoising", unit="step", disable=disable, file=sys.stderr)

    def __call__(self, report) -> None:
        if report.forward_pass:
            self.bar.update(1)

    def close(self):
        self.bar.close()


def run(args) -> int:
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    location = model_location(args)
    if args.infill_length < 1:
        fail(f"--infill-length must be at least 1, got {args.infill_length}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else torch.float32 if device == "cpu" else "auto"
    try:
        model = AutoModelForMaskedLM.from_pretrained(location, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as error:
        fail(f"cannot load a model from {location!r}: {error}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or location)
    except (OSError, ValueError) as error:
        fail(f"cannot load a tokenizer from {args.tokenizer or location!r} (name one with --tokenizer): {error}")

    mask_token_id = model.generation_config.mask_token_id
    if mask_token_id is None:
        mask_token_id = model.config.mask_token_id
    if args.infill is not None:
        ids = infill_ids(tokenizer, args.infill, args.mask_placeholder, args.infill_length, mask_token_id)
    else:
        if args.prompt is None and sys.stdin.isatty():
            print("reading the prompt from stdin (end it with Ctrl-D)", file=sys.stderr)
        text = args.prompt if args.prompt is not None else sys.stdin.read().rstrip("\n")
        ids = tokenizer(text).input_ids
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)

    settings = generation_settings(args)
    config = copy.deepcopy(model.generation_config)
    try:
        config.update(**settings)
    except ValueError as error:
        fail_with_flags(str(error))
    num_masks = (input_ids == mask_token_id).sum().item() + (config.max_new_tokens or 0)
    progress = StepProgress(total=config.steps or num_masks, disable=args.no_progress)
    try:
        sequences = model.generate(input_ids, generation_config=config, seed=args.seed, on_step=progress)
    except ValueError as error:
        fail_with_flags(str(error))
    finally:
        progress.close()
    print(tokenizer.decode(sequences[0], skip_special_tokens=True))
    return 0
