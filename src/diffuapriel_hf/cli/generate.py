"""`diffuapriel generate`: generate or infill text with a DiffuApriel model and print it.

    diffuapriel generate --prompt "def fibonacci(n):"        # the package's own model
    diffuapriel generate --model PATH --prompt "Once upon a time" --max-new-tokens 64
    echo "Once upon a time" | diffuapriel generate --model PATH
    diffuapriel generate --model PATH --infill "The <|mask|> sat on the <|mask|>." --infill-length 2

The model folder (or Hub id) must hold a tokenizer, or one is named with --tokenizer. Settings not given on the
command line come from the model's `generation_config.json`. The full text (prompt and generated tokens, special
tokens left out) goes to stdout; a progress bar of denoising steps goes to stderr.
"""

import argparse
import copy
import json
import os
import re
import sys
from pathlib import Path
from typing import Optional

from ..modeling.sampling import REMASKING_RULES
from ..shipped import default_model_path

__all__ = ["add_arguments", "generation_settings", "infill_ids", "run"]

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "owner/name"


def help_context_parser() -> argparse.ArgumentParser:
    """The first stage of the command's two-stage parse (see `diffuapriel_command`): --model alone, so that the help
    can show the generation defaults saved with that model."""
    parser = argparse.ArgumentParser(prog="diffuapriel generate", add_help=False)
    parser.add_argument("--model")
    return parser


def saved_defaults(model: Optional[str]) -> dict:
    """The generation settings saved in the `model` folder (the shipped model's for None), read from its
    generation_config.json without loading the model; {} for a Hub id or a folder without one."""
    folder = Path(model or default_model_path())
    try:
        return json.loads((folder / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}


def add_arguments(parser: argparse.ArgumentParser, model: Optional[str] = None) -> None:
    """The command's options; their help shows the defaults saved with `model` (the --model given, read by
    `help_context_parser`; None: the shipped model)."""
    parser.description = __doc__.split("\n\n")[0]
    saved = saved_defaults(model)

    def default(name: str, unset: str) -> str:
        return f"(the model's: {saved[name]})" if saved.get(name) is not None else f"(default: {unset})"

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
    parser.add_argument("--mask-placeholder", help="the placeholder in --infill text (default: the tokenizer's mask "
                        "token, '<|mask|>' for the shipped model, as in text given to generate())")
    parser.add_argument("--infill-length", type=int, default=1, help="mask tokens per placeholder (default 1)")
    sampling = parser.add_argument_group(
        "sampling", "Defaults: the model's generation_config.json. The new tokens are filled in blocks of "
        "--block-length (the last may be shorter); --steps are spread over the blocks in proportion to their tokens, "
        "at least one each, so --steps must be at least the number of blocks.")
    sampling.add_argument("--max-new-tokens", type=int, help=f"tokens to generate after the text "
                          f"{default('max_new_tokens', 'none: fill the --infill placeholders only')}")
    sampling.add_argument("--steps", type=int,
                          help=f"denoising steps in all {default('steps', 'unset: one token per step')}")
    sampling.add_argument("--block-length", type=int, help=f"tokens per semi-autoregressive block "
                          f"{default('block_length', 'unset: one block')}")
    sampling.add_argument("--remasking", choices=REMASKING_RULES,
                          help=f"which masks to commit at each step {default('remasking', 'low_confidence')}")
    sampling.add_argument("--confidence-threshold", type=float, help="also commit every token at least this likely "
                          f"{default('confidence_threshold', 'none')}")
    sampling.add_argument(
        "--block-cache", action="store_true",
        help="run each block's later steps on the block alone, reusing the rest's contribution (faster, approximate)",
    )
    sampling.add_argument("--temperature", type=float, help="sample at this temperature; 0 picks the most likely "
                          f"token {default('temperature', 'the most likely token, or 1 with --top-k/--top-p')}")
    sampling.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    sampling.add_argument("--top-p", type=float, help="sample within this much probability mass")
    sampling.add_argument("--seed", type=int, help="seed of the sampling (default: a fresh one)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
        help="weights' dtype (default: float32 on the CPU, as saved elsewhere)",
    )
    parser.add_argument("--show-drafts", action="store_true",
                        help="show each block while it is denoised, masks filling in place (a terminal's stdout)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


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


def model_location(args) -> str:
    """Where the model comes from: --model, else the model shipped with the package. A --model that is neither a
    folder nor shaped like a Hub id ("name" or "owner/name") is refused in one line."""
    if args.model is None:
        return default_model_path()
    if not os.path.isdir(args.model) and not HUB_ID.match(args.model):
        fail(f"--model {args.model!r}: no such folder (nor a Hub id such as 'owner/name')")
    return args.model


def torch_device(name):
    """--device as a torch device (default: cuda when available, else cpu), refused in one line if unusable."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        fail(f"--device {name!r}: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu")
    return device


def generation_settings(args) -> dict:
    """The sampling options given on the command line, as `generate()` keyword arguments."""
    names = ("max_new_tokens", "steps", "block_length", "remasking", "confidence_threshold", "top_k", "top_p")
    settings = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.top_k is not None or args.top_p is not None:  # they say how to sample: they ask for sampling
        settings["do_sample"] = True
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


def load(args, device):
    """The model and tokenizer the arguments name, or one line saying why they cannot be loaded."""
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    location = model_location(args)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else torch.float32 if device.type == "cpu" else "auto"
    try:
        model = AutoModelForMaskedLM.from_pretrained(location, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as error:
        fail(f"cannot load a model from {location!r}: {error}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or location)
    except (OSError, ValueError) as error:
        fail(f"cannot load a tokenizer from {args.tokenizer or location!r} (name one with --tokenizer): {error}")
    return model, tokenizer


def prompt_ids(args, tokenizer, mask_token_id: int) -> list[int]:
    """The token ids of --infill (its placeholders as mask tokens), --prompt, or stdin."""
    if args.infill is not None:
        placeholder = args.mask_placeholder or tokenizer.mask_token
        if placeholder is None:
            fail("the tokenizer has no mask token: name the --infill placeholder with --mask-placeholder")
        return infill_ids(tokenizer, args.infill, placeholder, args.infill_length, mask_token_id)
    if args.prompt is None and sys.stdin.isatty():
        print("reading the prompt from stdin (end it with Ctrl-D)", file=sys.stderr)
    text = args.prompt if args.prompt is not None else sys.stdin.read().rstrip("\n")
    return tokenizer(text).input_ids


def run(args) -> int:
    import torch
    from transformers import TextDiffusionStreamer
    from transformers.utils import logging as transformers_logging

    if args.infill_length < 1:
        fail(f"--infill-length must be at least 1, got {args.infill_length}")
    if args.no_progress:  # transformers' own bars too (loading the weights)
        transformers_logging.disable_progress_bar()
    device = torch_device(args.device)
    model, tokenizer = load(args, device)
    mask_token_id = model.generation_config.mask_token_id
    if mask_token_id is None:
        mask_token_id = model.config.mask_token_id
    input_ids = torch.tensor([prompt_ids(args, tokenizer, mask_token_id)], dtype=torch.long, device=device)
    config = copy.deepcopy(model.generation_config)
    try:
        config.update(**generation_settings(args))
    except ValueError as error:
        fail_with_flags(str(error))
    num_masks = (input_ids == mask_token_id).sum().item() + (config.max_new_tokens or 0)
    progress = StepProgress(total=config.steps or num_masks, disable=args.no_progress)
    streamer = TextDiffusionStreamer(tokenizer, skip_special_tokens=True) if args.show_drafts else None
    try:
        sequences = model.generate(input_ids, generation_config=config, seed=args.seed, on_step=progress,
                                   streamer=streamer)
    except ValueError as error:
        fail_with_flags(str(error))
    finally:
        progress.close()
    if streamer is None:  # the streamer has printed the text
        print(tokenizer.decode(sequences[0], skip_special_tokens=True))
    return 0
