"""`diffuapriel eval --model FOLDER_OR_HUB_ID --tasks ...`: lm-eval's own command line (`lm-eval run`) with the model
`diffuapriel` registered and `--model_args pretrained=...` set, so every lm-eval option works and is passed on as
given. `--model` names the DiffuApriel model here (default: the model shipped in the package); lm-eval's `--model`
(the kind of model) is always `diffuapriel`. Under `accelerate launch -m diffuapriel_command eval ...` every process
evaluates its share of the requests."""

import argparse
import sys

__all__ = ["PASSES_ON_UNKNOWN_OPTIONS", "add_arguments", "lm_eval_arguments", "run"]

# The dispatcher gives this command's options that it does not know (lm-eval's) to `run` as `args.passed_on`.
PASSES_ON_UNKNOWN_OPTIONS = True
LM_EVAL_MISSING = ("diffuapriel eval needs lm-evaluation-harness, which is not installed: pip install "
                   "\"diffuapriel-hf[eval]\" (or lm_eval)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.epilog = "Every other option is lm-eval's (lm-eval run --help lists them): --tasks, --batch_size, --limit, ..."
    parser.allow_abbrev = False  # lm-eval's options pass on as written, never read as abbreviations of ours
    parser.add_argument("--model", metavar="FOLDER_OR_HUB_ID", default=None,
                        help="the DiffuApriel model to evaluate (default: the model shipped in the package)")


def lm_eval_arguments(model, passed_on: list) -> list:
    """lm-eval's `run` arguments: `--model diffuapriel`, `pretrained=` before any `--model_args` given, the rest as
    given."""
    passed_on = list(passed_on)
    given = []
    for flag in ("--model_args", "--model-args"):
        while flag in passed_on:
            index = passed_on.index(flag)
            if index + 1 == len(passed_on):
                raise ValueError(f"{flag} needs a value: key=value,...")
            given.append(passed_on.pop(index + 1))
            passed_on.pop(index)
    model_args = ",".join(([f"pretrained={model}"] if model else []) + given)
    if model and any(part.split("=")[0].strip() == "pretrained" for part in ",".join(given).split(",")):
        raise ValueError("--model_args pretrained=... and --model both name the model: give it with --model")
    return ["run", "--model", "diffuapriel", *(["--model_args", model_args] if model_args else []), *passed_on]


def run(args) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print(f"diffuapriel eval: error: {LM_EVAL_MISSING}", file=sys.stderr)
        return 2
    from . import harness  # noqa: F401  (registers the model `diffuapriel` with lm-eval)

    try:
        arguments = lm_eval_arguments(args.model, args.passed_on)
    except ValueError as error:
        print(f"diffuapriel eval: error: {error}", file=sys.stderr)
        return 2
    saved = sys.argv
    sys.argv = ["lm-eval", *arguments]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
