"""The `diffuapriel` command: `diffuapriel {train,generate,convert,eval} ...`. Each subcommand lives in its own module of
`diffuapriel_hf`, imported only when it runs (or its help is asked for), and exposes `add_arguments(parser)` and
`run(args)`; one that sets `PASSES_ON_UNKNOWN_OPTIONS` (`diffuapriel eval`, whose other options are lm-eval's) gets
the options it does not declare as `args.passed_on`, the others refuse them. A subcommand whose help depends on an
option given with it (`diffuapriel generate --model PATH --help` shows the generation defaults saved with that model)
also exposes `help_context_parser()`, a parser of those options alone: the first stage of a two-stage parse, whose
values are passed to `add_arguments` as keyword arguments.

This dispatcher is a top-level module, outside the `diffuapriel_hf` package, because importing anything in that
package runs its `__init__`, which imports torch and transformers to register the model with the Auto classes: here,
`diffuapriel --help` answers without them."""

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "train": ("diffuapriel_hf.training.train", "train a model with transformers' Trainer"),
    "generate": ("diffuapriel_hf.cli.generate", "generate or infill text with a model"),
    "convert": ("diffuapriel_hf.hub.convert", "convert a Mamba-2 language model into DiffuApriel"),
    "eval": ("diffuapriel_hf.evaluation.command", "evaluate a model with lm-evaluation-harness (lm-eval's options)"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="diffuapriel", description="DiffuApriel masked diffusion language models")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text)
        if name == chosen:
            add_subcommand_arguments(importlib.import_module(module_name), sub, argv[1:])
    args, unknown = parser.parse_known_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    if getattr(module, "PASSES_ON_UNKNOWN_OPTIONS", False):
        args.passed_on = unknown
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return module.run(args) or 0


def add_subcommand_arguments(module, parser: argparse.ArgumentParser, argv: list) -> None:
    """The subcommand's options on `parser`; with a `help_context_parser`, read its options from the subcommand's
    `argv` first (parse_known_args: the other options and --help are left to the full parse) and pass them on."""
    if not hasattr(module, "help_context_parser"):
        module.add_arguments(parser)
        return
    context, _ = module.help_context_parser().parse_known_args(argv)
    module.add_arguments(parser, **vars(context))


if __name__ == "__main__":
    sys.exit(main())
