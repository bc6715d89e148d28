"""Train a DiffuApriel masked diffusion LM with `transformers.Trainer`: `diffuapriel train ...` or
`python -m diffuapriel_hf.training.train ...`.

Text files (each file one document) or a dataset saved with `datasets`' `save_to_disk` go in; the documents are
tokenized, joined with the eos token and cut into sequences of `--seq_len` tokens. The tokenizer is either trained
here (byte-level BPE with `tokenizers`, sized to the model's vocabulary) or an existing one given a mask token. A
held-out share of the sequences is evaluated as the negative ELBO in bits per token on a fixed grid of diffusion
times with fixed masks, so evaluations are comparable across steps and runs. The output folder holds the config,
safetensors weights, tokenizer, generation config, the train/eval metrics (tokens per second included) and a model
card (README.md: the training procedure and the held-out ELBO as model-index) unless it has a README.md already.

Distribution is `accelerate`'s, through `Trainer`: the same command runs under `accelerate launch` on several GPUs
with DDP or FSDP (see benchmarks/training_throughput.md).
"""

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
from typing import Optional

import torch
import yaml
from transformers import AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments, set_seed

from ..hub.folders import folder_entries, move_into_place, staging_folder, staging_path
from ..hub.publish import elbo_evaluation_results, model_card, pad_on_the_left
from ..modeling.configuration_diffuapriel import DiffuAprielConfig, preset_config
from ..modeling.modeling_diffuapriel import DiffuAprielForMaskedLM
from ..modeling.presets import PRESETS
from .checkpoints import StopOnSignal, check_output_dir, missing_checkpoint_files, resolve_checkpoint
from .data import DataCollatorForMaskedDiffusion, NoiseSeededDataset, document_stream
from .evaluation import ELBOEvaluationSet, ELBOMetricsCallback

__all__ = [
    "FIXED_TRAINING_ARGUMENTS",
    "TRAINING_DEFAULTS",
    "add_arguments",
    "chunk_documents",
    "load_corpus",
    "main",
    "read_text_files",
    "run",
    "train_bpe_tokenizer",
]

PROG = "diffuapriel train"
HELD_OUT_TEXT = "a held-out share of the training text"  # what the model card names the ELBO evaluation's data
# Our defaults where TrainingArguments' own suit pre-training a diffusion LM less (any of them can be given).
TRAINING_DEFAULTS = dict(
    learning_rate=3e-4, weight_decay=0.1, lr_scheduler_type="cosine", logging_steps=10, logging_first_step=True,
    eval_steps=500, save_steps=500, save_total_limit=2, report_to="none",
)
FIXED_TRAINING_ARGUMENTS = dict(
    # The collator reads the training examples' `noise_seed` column, which forward does not take.
    remove_unused_columns=False,
    # Every parameter takes part in every forward pass.
    ddp_find_unused_parameters=False,
)
EOS_TOKEN, PAD_TOKEN, MASK_TOKEN = "<|endoftext|>", "<|pad|>", "<|mask|>"
# Configuration entries that describe a run or a library version rather than the model.
NON_MODEL_CONFIG_KEYS = {"transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype", "auto_map",
                         "custom_pipelines"}


class ArgumentsFile(argparse.Action):
    """--args_file FILE (.json, .yaml or .yml): its entries are options of the command, as if given on the command
    line; an option the command line gives wins."""

    def __call__(self, parser, namespace, path, option_string=None):
        try:
            with open(path, encoding="utf-8") as handle:
                entries = json.load(handle) if path.endswith(".json") else yaml.safe_load(handle)
        except (OSError, ValueError, yaml.YAMLError) as error:
            parser.error(f"--args_file {path}: {error}")
        if not isinstance(entries, dict):
            parser.error(f"--args_file {path}: expected a mapping of option names to values")
        for key, value in entries.items():
            if key not in vars(namespace) or key == self.dest:
                parser.error(f"--args_file {path}: {key!r} is not an option of this command")
            if getattr(namespace, key) == parser.get_default(key):
                setattr(namespace, key, value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--args_file", metavar="FILE", action=ArgumentsFile,
                        help="a JSON or YAML file of options (option name: value); the command line wins")
    data = parser.add_argument_group("data")
    # Required, but possibly from --args_file: checked by `check_arguments`.
    source = data.add_mutually_exclusive_group()
    source.add_argument("--train_files", nargs="+", metavar="FILE", help="UTF-8 text files, each one document")
    source.add_argument("--dataset", metavar="DIR",
                        help="a dataset saved by datasets' save_to_disk ('train' split of a DatasetDict)")
    data.add_argument("--text_column", default="text", help="the dataset's text column (default: text)")
    data.add_argument("--seq_len", type=int, default=1024, help="tokens per training sequence (default: 1024)")
    data.add_argument("--eval_fraction", type=float, default=0.01,
                      help="share of the sequences held out for the ELBO evaluation; 0 turns evaluation off")
    data.add_argument("--elbo_samples", type=int, default=8,
                      help="diffusion times on the ELBO evaluation grid, per held-out sequence (default: 8)")

    model = parser.add_argument_group("model and tokenizer")
    config = model.add_mutually_exclusive_group()
    config.add_argument("--preset", choices=sorted(PRESETS), help="a named model configuration")
    config.add_argument("--config", metavar="PATH", help="a config.json, or a folder holding one (random weights)")
    config.add_argument("--model_name_or_path", metavar="NAME_OR_PATH",
                        help="fine-tune a trained DiffuApriel model (a folder or a Hub id) from its weights, with its "
                             "tokenizer unless --tokenizer names another")
    model.add_argument("--vocab_size", type=int, help="override the configuration's vocab_size")
    model.add_argument("--block_size", type=int,
                       help="train a block diffusion model with blocks of this many tokens (BD3-LM's objective; a "
                            "full-sequence --model_name_or_path is fine-tuned into one); default: the configuration's")
    model.add_argument("--tokenizer", metavar="NAME_OR_PATH",
                       help="an existing tokenizer (a mask token is added if missing); default: the model's with "
                            "--model_name_or_path, else a byte-level BPE tokenizer of the model's vocab_size trained on "
                            "the training text")

    model.add_argument("--overwrite_output_dir", action="store_true",
                       help="replace the model in an --output_dir that holds files (other files are kept; an earlier "
                            "run's checkpoints are removed)")

    # Every option of transformers' TrainingArguments, as its own HfArgumentParser declares it (what `parents=` does).
    parser._add_container_actions(HfArgumentParser(TrainingArguments, add_help=False))
    parser.set_defaults(**TRAINING_DEFAULTS)


def read_text_files(paths: list[str]) -> list[str]:
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"--train_files: {path!r} is not a file")
    texts = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as handle:
            texts.append(handle.read())
    return texts


def load_corpus(args):
    """The training documents as a `datasets.Dataset` with the columns `text` and `source` (the file, or the saved
    dataset and row, that errors in the text are reported against)."""
    try:
        import datasets
    except ImportError as error:
        raise ValueError(
            "the train command reads its corpus with the `datasets` package, which is not installed: pip install "
            "datasets (or install this package with its [train] extra)"
        ) from error

    if args.train_files:
        corpus = datasets.Dataset.from_dict({"text": read_text_files(args.train_files), "source": args.train_files})
    else:
        if not os.path.isdir(args.dataset):
            raise ValueError(f"--dataset: {args.dataset!r} is not a folder saved by datasets' save_to_disk")
        corpus = datasets.load_from_disk(args.dataset)
        if isinstance(corpus, datasets.DatasetDict):
            if "train" not in corpus:
                raise ValueError(f"--dataset: the DatasetDict has no 'train' split (splits: {list(corpus)})")
            corpus = corpus["train"]
        if args.text_column not in corpus.column_names:
            raise ValueError(
                f"--text_column: {args.text_column!r} is not a column of the dataset ({corpus.column_names})"
            )
        corpus = corpus.select_columns([args.text_column]).rename_column(args.text_column, "text")
        corpus = corpus.add_column("source", [f"{args.dataset} row {i}" for i in range(len(corpus))])
    if not any(text and text.strip() for text in corpus["text"]):
        raise ValueError("the training corpus is empty: no document holds any text")
    return corpus


def train_bpe_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer of `vocab_size` tokens trained on `texts` (strings or batches of strings), with eos
    (also bos), pad and mask tokens, as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    special = [EOS_TOKEN, PAD_TOKEN, MASK_TOKEN]
    if vocab_size < len(alphabet) + len(special):
        raise ValueError(
            f"vocab_size {vocab_size} leaves no room for a byte-level BPE tokenizer and its mask token: it needs at "
            f"least {len(alphabet) + len(special)} (256 bytes and {len(special)} special tokens); raise --vocab_size"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN,
    )


def prepare_tokenizer(tokenizer, vocab_size: int):
    """Give an existing tokenizer the special tokens training needs (mask, eos; pad = eos), make it pad on the left
    (the saved model's `generate()` takes left-padded batches; the collator and the model treat padding on either
    side alike) and check that the model's vocabulary holds all of its tokens."""
    added = {}
    if tokenizer.mask_token is None:
        added["mask_token"] = MASK_TOKEN
    if tokenizer.eos_token is None:
        added["eos_token"] = EOS_TOKEN
    if added:
        tokenizer.add_special_tokens(added)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is never attended to nor counted
    pad_on_the_left(tokenizer)
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens{' with the added ' + ', '.join(added) if added else ''}, more "
            f"than the model's vocab_size {vocab_size}: no room for its mask token; raise --vocab_size to at least "
            f"{len(tokenizer)}"
        )
    return tokenizer


def chunk_documents(batch: dict, tokenizer, seq_len: int) -> dict:
    """`datasets.map(batched=True)` function: tokenize the documents, end each with eos, join them and cut the stream
    into sequences of `seq_len` tokens (the tail shorter than `seq_len` is dropped). Text that spells a special token
    is tokenized as text; a document that gives the mask token is refused, naming its `source`."""
    stream = document_stream(tokenizer, batch["text"], batch.get("source"))
    return {"input_ids": [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]}


def check_resume_config(config: DiffuAprielConfig, checkpoint: str) -> None:
    saved = DiffuAprielConfig.from_pretrained(checkpoint).to_dict()
    ours = config.to_dict()
    differences = sorted(
        k for k in set(saved) | set(ours) if k not in NON_MODEL_CONFIG_KEYS and saved.get(k) != ours.get(k)
    )
    if differences:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {ours.get(k)!r}" for k in differences)
        raise ValueError(f"--resume_from_checkpoint {checkpoint!r} does not match this run's model config ({details})")


def load_config(args) -> DiffuAprielConfig:
    """The model configuration of --preset, --config or --model_name_or_path; a path or id that gives none is refused
    naming the flag."""
    if not (args.preset or args.config or args.model_name_or_path):
        raise ValueError("one of --preset, --config or --model_name_or_path is required (on the command line or in "
                         "--args_file)")
    if args.preset:
        return preset_config(args.preset)
    flag, location = ("--config", args.config) if args.config else ("--model_name_or_path", args.model_name_or_path)
    try:
        return DiffuAprielConfig.from_pretrained(location)
    except OSError as error:
        raise ValueError(f"{flag} {location!r} gives no DiffuApriel config: {str(error).splitlines()[0]}") from error


def check_arguments(args, config: DiffuAprielConfig) -> int:
    """Refuse bad values before anything is read or written; returns the model's vocabulary size."""
    if not (args.train_files or args.dataset):
        raise ValueError("one of --train_files or --dataset is required (on the command line or in --args_file)")
    vocab_size = config.vocab_size if args.vocab_size is None else args.vocab_size
    if vocab_size < 1:
        raise ValueError(f"--vocab_size must be positive, got {vocab_size}")
    if args.model_name_or_path and vocab_size != config.vocab_size:
        raise ValueError(f"--vocab_size {vocab_size} differs from the vocab_size {config.vocab_size} of the model of "
                         "--model_name_or_path, whose weights are kept: leave out --vocab_size")
    if args.dataloader_persistent_workers:
        raise ValueError("--dataloader_persistent_workers would keep the first epoch's noise seeds in its workers "
                         "(NoiseSeededDataset follows the epoch): leave it out")
    if args.bf16 and not args.use_cpu and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        raise ValueError("--bf16 needs a GPU with bfloat16 support, and none is here: leave out --bf16")
    if args.seq_len < 1:
        raise ValueError(f"--seq_len must be positive, got {args.seq_len}")
    if args.block_size is not None and args.block_size < 1:
        raise ValueError(f"--block_size must be positive, got {args.block_size}")
    if config.max_position_embeddings is not None and args.seq_len > config.max_position_embeddings:
        raise ValueError(
            f"--seq_len {args.seq_len} is above the config's max_position_embeddings {config.max_position_embeddings}"
            ": lower --seq_len, or raise max_position_embeddings in a --config file"
        )
    if not 0 <= args.eval_fraction < 1:
        raise ValueError(f"--eval_fraction must be in [0, 1), got {args.eval_fraction}")
    if args.elbo_samples < 1:
        raise ValueError(f"--elbo_samples must be positive, got {args.elbo_samples}")
    return vocab_size


def training_arguments(args) -> TrainingArguments:
    """TrainingArguments of the options given (those at TrainingArguments' own defaults are left to it: newer versions
    warn on some of them, e.g. gradient_checkpointing), with what the model and the collator need fixed."""
    if not args.output_dir:
        raise ValueError("--output_dir is required: name the folder to write the model and checkpoints to")
    values = {
        field.name: getattr(args, field.name) for field in dataclasses.fields(TrainingArguments)
        if field.init and hasattr(args, field.name) and getattr(args, field.name) != field_default(field)
    }
    values.update(FIXED_TRAINING_ARGUMENTS, eval_strategy="steps" if args.eval_fraction > 0 else "no")
    return TrainingArguments(**values)


def field_default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def load_tokenizer(args, corpus, training_args, checkpoint: Optional[str], vocab_size: int):
    """The checkpoint's tokenizer when resuming, else the fine-tuned model's, `--tokenizer` or one trained on the
    corpus. The main process makes it and saves it under --output_dir/tokenizer; the others load that copy, so all
    share one vocabulary."""
    tokenizer_dir = os.path.join(args.output_dir, "tokenizer")
    with training_args.main_process_first(local=False, desc="tokenizer"):
        if checkpoint is not None:
            tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        elif args.model_name_or_path and not args.tokenizer:
            tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        elif not training_args.should_save:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        else:
            if args.tokenizer:
                tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(args.tokenizer), vocab_size)
            else:
                tokenizer = train_bpe_tokenizer((b["text"] for b in corpus.iter(batch_size=1000)), vocab_size)
            tokenizer.save_pretrained(tokenizer_dir)
    return prepare_tokenizer(tokenizer, vocab_size)


def split_sequences(corpus, tokenizer, args):
    """(training set, ELBO evaluation set or None) of `--seq_len`-token sequences; each training example carries a
    noise seed (`NoiseSeededDataset`), so that a resumed run draws the noise of the uninterrupted one."""
    sequences = corpus.map(
        chunk_documents, batched=True, remove_columns=corpus.column_names,
        fn_kwargs=dict(tokenizer=tokenizer, seq_len=args.seq_len), desc="tokenizing",
    )
    num_eval = math.ceil(args.eval_fraction * len(sequences)) if args.eval_fraction > 0 else 0
    if len(sequences) - num_eval < 1:
        raise ValueError(
            f"the corpus gives {len(sequences)} sequence(s) of {args.seq_len} tokens: too few to train"
            + (f" and hold out {num_eval} for evaluation" if num_eval else "")
            + "; add text or lower --seq_len"
        )
    train_dataset = NoiseSeededDataset(sequences.select(range(len(sequences) - num_eval)), args.seed)
    if not num_eval:
        return train_dataset, None
    held_out = sequences.select(range(len(sequences) - num_eval, len(sequences)))["input_ids"]
    return train_dataset, ELBOEvaluationSet(held_out, tokenizer.mask_token_id, num_samples=args.elbo_samples)


def prepare(args, stop: StopOnSignal) -> tuple[Trainer, Optional[str]]:
    """Everything before the first step, where every bad input is refused: (the Trainer, the checkpoint to resume)."""
    config = load_config(args)
    vocab_size = check_arguments(args, config)
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    training_args = training_arguments(args)
    if training_args.should_save:
        check_output_dir(args.output_dir, args.overwrite_output_dir, checkpoint)
    corpus = load_corpus(args)
    tokenizer = load_tokenizer(args, corpus, training_args, checkpoint, vocab_size)
    config.update(dict(
        vocab_size=vocab_size, mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        **({} if args.block_size is None else {"block_size": args.block_size}),
    ))
    config.validate()
    if checkpoint is not None:
        check_resume_config(config, checkpoint)
    train_dataset, eval_dataset = split_sequences(corpus, tokenizer, args)
    set_seed(args.seed)  # the initial weights
    if args.model_name_or_path:
        # On a full-sequence model made a block model (--block_size), from_pretrained drops the saved block_length.
        model = DiffuAprielForMaskedLM.from_pretrained(args.model_name_or_path, config=config, dtype=torch.float32)
    else:
        model = DiffuAprielForMaskedLM(config)
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_dataset,
        eval_dataset=eval_dataset, callbacks=[stop, ELBOMetricsCallback()],
        data_collator=DataCollatorForMaskedDiffusion(tokenizer, sampling_eps=config.sampling_eps,
                                                     block_size=config.block_size),
        processing_class=tokenizer,
    )
    return trainer, checkpoint


def _option_name(option) -> str:
    return str(getattr(option, "value", option))  # TrainingArguments holds some options as enums


def training_procedure(trainer: Trainer, args) -> str:
    """The model card's account of a finished run: where it started, the data, the objective, the optimisation."""
    if args.model_name_or_path:
        start = f"fine-tuned from `{args.model_name_or_path}`"
    else:
        start = "trained from random weights (" + (f"preset `{args.preset}`" if args.preset else
                                                   f"config `{args.config}`") + ")"
    data = f"{len(args.train_files)} text files" if args.train_files else f"the dataset `{args.dataset}`"
    run, block_size = trainer.args, getattr(trainer.model.config, "block_size", None)
    objective = (f"BD3-LM's block diffusion objective (blocks of {block_size} tokens)" if block_size else
                 "the masked diffusion (MDLM) objective")
    batch = run.per_device_train_batch_size * run.gradient_accumulation_steps * run.world_size
    precision = "bf16" if run.bf16 else "fp16" if run.fp16 else "fp32"
    return (f"`diffuapriel train` (transformers' `Trainer`), {start}, on {data} cut into sequences of {args.seq_len} "
            f"tokens, with {objective}: {trainer.state.global_step} optimizer steps of {batch} sequences in "
            f"{run.world_size} process(es), {_option_name(run.optim)} at learning rate {run.learning_rate:g} "
            f"({_option_name(run.lr_scheduler_type)} schedule), weight decay {run.weight_decay:g}, {precision}.")


def write_model_card(folder, **card_fields) -> None:
    """README.md in a saved model folder: the model card of the model it holds (built on the meta device from its
    config.json, so that the parameters are counted whole however training sharded them)."""
    config = DiffuAprielConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = DiffuAprielForMaskedLM(config)
    model_card(model, **card_fields).save(os.path.join(folder, "README.md"))


def save_final_model(trainer: Trainer, output_dir: str, card_fields: Optional[dict] = None) -> None:
    """The model, its config, generation_config.json and the tokenizer, written beside --output_dir and moved into it
    once complete (its checkpoints and metrics are kept), with a model card (`card_fields` for `model_card`) unless
    the folder has a README.md of its own already."""
    staging = staging_path(output_dir)
    if trainer.args.should_save:
        staging_folder(output_dir)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # every process takes part (FSDP gathers the weights); the main one writes
    if trainer.args.should_save:
        if card_fields is not None and "README.md" not in folder_entries(output_dir):
            write_model_card(staging, **card_fields)
        move_into_place(staging, output_dir)


def train_and_save(trainer: Trainer, checkpoint: Optional[str], args, stop: StopOnSignal) -> int:
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if stop.received is not None:
        step = trainer.state.global_step
        saved = os.path.join(args.output_dir, f"checkpoint-{step}")
        saved_note = (f"saved {saved}; continue with --resume_from_checkpoint last"
                      if not missing_checkpoint_files(saved) else "no checkpoint saved")
        print(f"{PROG}: stopped by {stop.received.name} after step {step}: {saved_note}", file=sys.stderr)
        return 128 + stop.received.value
    metrics = dict(result.metrics)
    metrics["train_tokens_per_second"] = metrics["train_samples_per_second"] * args.seq_len
    metrics["world_size"] = trainer.args.world_size
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    eval_metrics = {}
    if trainer.eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    card_fields = dict(repo_id=trainer.args.hub_model_id or args.output_dir,  # where the card says to load it from
                       training_procedure=training_procedure(trainer, args),
                       eval_results=elbo_evaluation_results(eval_metrics, HELD_OUT_TEXT))
    save_final_model(trainer, args.output_dir, card_fields)
    return 0


def stopped(stop: StopOnSignal, what: str) -> int:
    received = stop.received or signal.SIGINT
    print(f"{PROG}: stopped at once by {received.name} {what}", file=sys.stderr)
    return 128 + received.value


def run(args) -> int:
    """`diffuapriel train`: a refused input is one line on stderr (exit status 2); Ctrl-C or SIGTERM stops at a step
    boundary with a checkpoint (exit status 128 + the signal's number), a second one at once."""
    with StopOnSignal() as stop:
        try:
            trainer, checkpoint = prepare(args, stop)
        except ValueError as error:
            print(f"{PROG}: error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return stopped(stop, "before training started: nothing saved")
        try:
            return train_and_save(trainer, checkpoint, args, stop)
        except KeyboardInterrupt:
            return stopped(stop, f"at step {trainer.state.global_step}: nothing saved since the last checkpoint")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
