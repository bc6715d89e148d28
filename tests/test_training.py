"""Training with transformers' Trainer and the train command, on the CPU with the tiny preset and real text (a few
of the Python standard library's own source files)."""

import json
import os
import re
import shutil
import subprocess
from argparse import Namespace
import sys
import sysconfig

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from diffuapriel_hf import (
    DataCollatorForMaskedDiffusion, DiffuAprielForMaskedLM, DiffusionGenerationConfig, preset_config,
)
from diffuapriel_hf.cli import main as cli_main
from diffuapriel_hf.modeling.diffusion import bits_per_token, token_nll
from diffuapriel_hf.training.train import chunk_documents, load_corpus, read_text_files, train_bpe_tokenizer

STDLIB = sysconfig.get_paths()["stdlib"]
SOURCE_FILES = [os.path.join(STDLIB, name) for name in ("textwrap.py", "string.py", "bisect.py", "heapq.py")]
VOCAB_SIZE = 320
SEQ_LEN = 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(read_text_files(SOURCE_FILES), VOCAB_SIZE)


@pytest.fixture(scope="module")
def sequences(tokenizer):
    return chunk_documents({"text": read_text_files(SOURCE_FILES)}, tokenizer, SEQ_LEN)["input_ids"]


@pytest.fixture
def tiny_model(tiny_model, tokenizer):
    """The shared tiny model, with the vocabulary of the BPE tokenizer trained here."""
    vocabulary = dict(
        vocab_size=VOCAB_SIZE, mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    return lambda seed=0: tiny_model(seed=seed, **vocabulary)


def training_arguments(output_dir, **overrides):
    fields = dict(
        output_dir=str(output_dir), per_device_train_batch_size=8, learning_rate=3e-3, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
        dataloader_pin_memory=False,
    )
    fields.update(overrides)
    return TrainingArguments(**fields)


def test_tokenizer_and_chunks(tokenizer, sequences):
    assert len(tokenizer) == VOCAB_SIZE
    assert {tokenizer.mask_token, tokenizer.pad_token, tokenizer.eos_token} == {"<|mask|>", "<|pad|>", "<|endoftext|>"}
    text = read_text_files(SOURCE_FILES[:1])[0]
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text  # byte-level: lossless
    assert len(sequences) > 100 and all(len(ids) == SEQ_LEN for ids in sequences)
    assert sum(ids.count(tokenizer.eos_token_id) for ids in sequences) >= len(SOURCE_FILES) - 1


def test_trainer_loss_falls_on_real_text(tokenizer, sequences, tmp_path, tiny_model):
    held_out = torch.tensor(sequences[-16:])  # (16, SEQ_LEN)
    model = tiny_model()
    bits_before = bits_per_token(model.compute_elbo(held_out, num_samples=4), held_out.numel())
    trainer = Trainer(
        model=model, args=training_arguments(tmp_path, max_steps=40),
        train_dataset=[{"input_ids": ids} for ids in sequences[:-16]],
        data_collator=DataCollatorForMaskedDiffusion(tokenizer),
    )
    trainer.train()
    bits_after = bits_per_token(model.compute_elbo(held_out, num_samples=4), held_out.numel())
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 40
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    # Measured: training loss 5.30 -> 4.33 nats (means of the first and last 10 steps; each step's loss is noisy,
    # its t is random), held-out negative ELBO 8.44 -> 6.28 bits per token (log2(320) = 8.32 at the start).
    assert last < first - 0.5, (first, last)
    assert bits_before > 8.0 and bits_after < bits_before - 1.5, (bits_before, bits_after)


class RecordWeightsAtStart(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights = {name: p.detach().clone() for name, p in model.state_dict().items()}
        self.global_step = state.global_step


def test_checkpoint_saves_and_resumes(tokenizer, sequences, tmp_path, tiny_model):
    dataset = [{"input_ids": ids} for ids in sequences[:64]]
    collator = DataCollatorForMaskedDiffusion(tokenizer)
    first = Trainer(
        model=tiny_model(), args=training_arguments(tmp_path, max_steps=6, save_strategy="steps", save_steps=3),
        train_dataset=dataset, data_collator=collator,
    )
    first.train()
    checkpoint = tmp_path / "checkpoint-3"
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"} <= set(
        os.listdir(checkpoint)
    )

    recorder = RecordWeightsAtStart()
    second = Trainer(
        model=tiny_model(seed=1), args=training_arguments(tmp_path, max_steps=6),
        train_dataset=dataset, data_collator=collator, callbacks=[recorder],
    )
    second.train(resume_from_checkpoint=str(checkpoint))
    # The resumed run starts from the checkpoint's weights and step, not from its own initialisation, and goes on.
    saved = load_file(checkpoint / "model.safetensors")
    for name, tensor in saved.items():
        torch.testing.assert_close(recorder.weights[name], tensor, rtol=0, atol=0)
    assert recorder.global_step == 3 and second.state.global_step == 6
    resumed_losses = [entry["loss"] for entry in second.state.log_history if "loss" in entry]
    original_losses = [entry["loss"] for entry in first.state.log_history if "loss" in entry]
    assert resumed_losses[:3] == original_losses[:3] and len(resumed_losses) == 6
    assert all(torch.isfinite(torch.tensor(resumed_losses)))


def test_sft_batch_through_the_model_counts_only_the_answer(tokenizer, tiny_model):
    model = tiny_model().eval()
    prompt = tokenizer("def add(a, b):", add_special_tokens=False)["input_ids"]
    answer = tokenizer("    return a + b", add_special_tokens=False)["input_ids"]
    collator = DataCollatorForMaskedDiffusion(tokenizer)
    examples = [{"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}] * 4
    torch.manual_seed(0)
    for _ in range(20):
        batch = collator(examples)
        assert torch.equal(batch["input_ids"][:, : len(prompt)], torch.tensor([prompt] * 4))
        assert bool((batch["loss_weights"][:, : len(prompt)] == 0).all())
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        # Normalised per answer token: the prompt is not in the count.
        logits = model(input_ids=batch["input_ids"]).logits
        expected = (token_nll(logits, batch["labels"], tokenizer.mask_token_id) * batch["loss_weights"]).sum() / (
            4 * len(answer)
        )
        torch.testing.assert_close(loss, expected)


def train_command(output_dir, *extra, files=SOURCE_FILES, model=("--preset", "tiny")):
    return cli_main([
        "train", "--train_files", *files, *model, "--vocab_size", str(VOCAB_SIZE),
        "--seq_len", str(SEQ_LEN), "--output_dir", str(output_dir), "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "16", "--learning_rate", "3e-3", "--logging_steps", "2", "--eval_steps", "4",
        "--save_steps", "2", "--eval_fraction", "0.05", "--elbo_samples", "2", *extra,
    ])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("train_command")
    assert train_command(output_dir, "--max_steps", "4") == 0
    return output_dir


def test_train_command_output_reloads(trained):
    files = set(os.listdir(trained))
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "train_results.json",
            "eval_results.json", "checkpoint-4"} <= files
    model = AutoModelForMaskedLM.from_pretrained(trained)
    tokenizer = AutoTokenizer.from_pretrained(trained)
    assert isinstance(model, DiffuAprielForMaskedLM)
    assert isinstance(model.generation_config, DiffusionGenerationConfig)
    assert model.config.mask_token_id == tokenizer.mask_token_id and model.config.vocab_size == VOCAB_SIZE
    # The tokenizer pads on the left, as generate() needs, in the model folder and in its checkpoints.
    assert tokenizer.padding_side == "left"
    for folder in (trained, trained / "checkpoint-4"):
        assert json.loads((folder / "tokenizer_config.json").read_text())["padding_side"] == "left", folder
    with open(trained / "generation_config.json") as handle:
        assert json.load(handle)["mask_token_id"] == tokenizer.mask_token_id
    with open(trained / "eval_results.json") as handle:
        metrics = json.load(handle)
    # The evaluation is the negative ELBO per token: its loss in nats and the same in bits.
    assert 0 < metrics["eval_bits_per_token"] < 2 * torch.log2(torch.tensor(float(VOCAB_SIZE)))
    assert metrics["eval_bits_per_token"] == pytest.approx(metrics["eval_loss"] / 0.6931471805599453, rel=1e-4)
    # Fixed times and masks: the evaluation at step 4 during training and the final one (same weights) agree exactly.
    with open(trained / "checkpoint-4" / "trainer_state.json") as handle:
        during = [entry for entry in json.load(handle)["log_history"] if "eval_bits_per_token" in entry]
    assert during[-1]["step"] == 4 and during[-1]["eval_bits_per_token"] == metrics["eval_bits_per_token"]
    with open(trained / "train_results.json") as handle:
        assert json.load(handle)["train_tokens_per_second"] > 0
    # The model card: the run's procedure, and the held-out ELBO as model-index.
    card = ModelCard.load(trained / "README.md")
    assert card.data.pipeline_tag == "text-generation" and card.data.license == "apache-2.0"
    assert {(r.metric_type, r.metric_value) for r in card.data.eval_results} == {
        ("bits_per_token", metrics["eval_bits_per_token"]), ("perplexity_bound", metrics["eval_perplexity_bound"])}
    assert "trained from random weights (preset `tiny`)" in card.text and f"sequences of {SEQ_LEN} tokens" in card.text
    assert "4 optimizer steps of 8 sequences in 1 process(es)" in card.text
    assert f"{model.num_parameters():,}" in card.text
    ids = tokenizer("import os\n", return_tensors="pt")["input_ids"]
    nelbo = model.compute_elbo(ids, num_samples=2)
    assert nelbo.shape == (1,) and torch.isfinite(nelbo).all()


def test_train_command_resumes(trained, tmp_path):
    output_dir = tmp_path / "resumed"
    os.makedirs(output_dir)
    subprocess.run(["cp", "-r", str(trained / "checkpoint-4"), str(output_dir)], check=True)
    assert train_command(output_dir, "--max_steps", "6", "--resume_from_checkpoint", "last") == 0
    with open(output_dir / "checkpoint-6" / "trainer_state.json") as handle:
        state = json.load(handle)
    assert state["global_step"] == 6
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry][:3] == [1, 2, 4]


@pytest.fixture
def no_training(monkeypatch):
    """Fail loudly if a bad input reaches the training loop."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(Trainer, "train", refuse)


def assert_refused(capsys, pattern, output_dir, *extra, **kwargs):
    """The train command refuses with exit status 2 and one line on stderr matching `pattern`."""
    capsys.readouterr()
    assert train_command(output_dir, *extra, **kwargs) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("diffuapriel train: error: "), error
    assert re.search(pattern, error), error


def test_empty_corpus_is_refused(no_training, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    assert_refused(capsys, "corpus is empty", tmp_path / "out", "--max_steps", "1", files=[str(empty)])


def test_corpus_shorter_than_one_sequence_is_refused(no_training, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n" * 3)
    assert_refused(capsys, "too few to train", tmp_path / "out", "--max_steps", "1", "--vocab_size", "300",
                   files=[str(short)])


def test_tokenizer_without_room_for_a_mask_token_is_refused(no_training, tmp_path, capsys):
    assert_refused(capsys, "no room for a byte-level BPE tokenizer and its mask token", tmp_path / "out",
                   "--max_steps", "1", "--vocab_size", "200")
    # An existing tokenizer whose vocabulary fills the model's: adding the mask token overflows it.
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(read_text_files(SOURCE_FILES[:1]), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    ))
    full = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    assert len(full) == 300 and full.mask_token is None
    full.save_pretrained(tmp_path / "full_tokenizer")
    assert_refused(capsys, "no room for its mask token", tmp_path / "out2", "--max_steps", "1", "--vocab_size", "300",
                   "--tokenizer", str(tmp_path / "full_tokenizer"))


def test_bad_numbers_are_refused_by_name(no_training, tmp_path, capsys):
    limit = preset_config("tiny").max_position_embeddings
    assert_refused(capsys, f"--seq_len {limit + 1} is above the config's max_position_embeddings {limit}",
                   tmp_path / "out", "--max_steps", "1", "--seq_len", str(limit + 1))
    assert_refused(capsys, "--vocab_size must be positive, got 0", tmp_path / "out", "--max_steps", "1",
                   "--vocab_size", "0")
    assert_refused(capsys, "--seq_len must be positive", tmp_path / "out", "--seq_len", "0")
    assert_refused(capsys, "--block_size must be positive, got 0", tmp_path / "out", "--block_size", "0")
    assert_refused(capsys, r"--eval_fraction must be in \[0, 1\)", tmp_path / "out", "--eval_fraction", "1")
    assert not (tmp_path / "out").exists()


def test_sequence_length_above_a_config_files_limit_is_refused(no_training, tmp_path, capsys):
    preset_config("tiny", max_position_embeddings=16).save_pretrained(tmp_path / "config")
    assert_refused(capsys, "--seq_len 32 is above the config's max_position_embeddings 16", tmp_path / "out",
                   "--max_steps", "1", model=("--config", str(tmp_path / "config")))


def test_saved_dataset_as_corpus(tmp_path):
    import datasets

    texts = read_text_files(SOURCE_FILES[:2])
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": texts, "n": [1, 2]})}).save_to_disk(
        tmp_path / "corpus"
    )
    corpus = load_corpus(Namespace(train_files=None, dataset=str(tmp_path / "corpus"), text_column="content"))
    assert corpus.column_names == ["text", "source"] and corpus["text"] == texts
    assert corpus["source"] == [f"{tmp_path / 'corpus'} row 0", f"{tmp_path / 'corpus'} row 1"]
    with pytest.raises(ValueError, match="--text_column: 'body' is not a column"):
        load_corpus(Namespace(train_files=None, dataset=str(tmp_path / "corpus"), text_column="body"))


def test_resume_from_a_different_config_is_refused(trained, no_training, tmp_path, capsys):
    assert_refused(capsys, "does not match this run's model config.*vocab_size", tmp_path / "out", "--max_steps", "8",
                   "--vocab_size", str(VOCAB_SIZE + 64), "--resume_from_checkpoint", str(trained / "checkpoint-4"))


def test_fine_tuning_starts_from_the_models_weights_and_tokenizer(trained, tmp_path):
    # At learning rate 0 (AdamW then moves nothing, decay included) the saved model is the one it started from.
    output = tmp_path / "fine-tuned"
    assert train_command(output, "--max_steps", "1", "--learning_rate", "0", "--eval_fraction", "0",
                         model=("--model_name_or_path", str(trained))) == 0
    for name, tensor in load_file(trained / "model.safetensors").items():
        assert torch.equal(load_file(output / "model.safetensors")[name], tensor), name
    assert AutoTokenizer.from_pretrained(output).get_vocab() == AutoTokenizer.from_pretrained(trained).get_vocab()


def test_a_full_sequence_model_fine_tunes_into_a_block_model(trained, tmp_path):
    # A full-sequence model whose saved generation config sets its own generation blocks, as the shipped model does.
    source = tmp_path / "source"
    shutil.copytree(trained, source, ignore=shutil.ignore_patterns("checkpoint-*"))
    DiffusionGenerationConfig.from_pretrained(source, block_length=4).save_pretrained(source)
    output = tmp_path / "block"
    assert train_command(output, "--max_steps", "2", "--eval_fraction", "0", "--block_size", "8",
                         model=("--model_name_or_path", str(source))) == 0
    model = DiffuAprielForMaskedLM.from_pretrained(output)
    assert model.config.block_size == 8 and DiffuAprielForMaskedLM.from_pretrained(trained).config.block_size is None
    assert any(not torch.equal(load_file(output / "model.safetensors")[name], tensor)
               for name, tensor in load_file(trained / "model.safetensors").items())
    # Its generation takes the block model's own blocks: the source's block length is not kept.
    assert model.generation_config.block_length is None
    assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=10).shape == (1, 13)


def test_fine_tuning_misuse_is_refused_by_name(trained, no_training, tmp_path, capsys):
    assert_refused(capsys, "--vocab_size 512 differs from the vocab_size 320 of the model of --model_name_or_path",
                   tmp_path / "out", "--vocab_size", "512", model=("--model_name_or_path", str(trained)))
    assert_refused(capsys, "--model_name_or_path '.*nowhere' gives no DiffuApriel config", tmp_path / "out",
                   model=("--model_name_or_path", str(tmp_path / "nowhere")))


def test_missing_datasets_and_bf16_without_a_gpu_are_one_line(no_training, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    assert_refused(capsys, "`datasets` package, which is not installed: pip install datasets", tmp_path / "out")
    if not torch.cuda.is_available():
        assert_refused(capsys, "--bf16 needs a GPU with bfloat16 support", tmp_path / "out", "--bf16")


def test_every_trainer_option_is_an_option(tmp_path, monkeypatch, capsys):
    used = {}
    monkeypatch.setattr(Trainer, "train", lambda self, **kwargs: used.setdefault("args", self.args) and 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train_command(tmp_path / "out", "--optim", "adafactor", "--max_grad_norm", "0.5", "--adam_beta2", "0.95",
                      "--gradient_checkpointing", "--lr_scheduler_type", "constant", "--eval_fraction", "0")
    args = used["args"]
    assert (args.optim, args.max_grad_norm, args.adam_beta2, args.lr_scheduler_type) == (
        "adafactor", 0.5, 0.95, "constant")
    assert args.learning_rate == 3e-3 and args.save_total_limit == 2 and args.eval_strategy == "no"  # ours kept
    assert args.remove_unused_columns is False
    monkeypatch.setattr(Trainer, "train", lambda *a, **k: pytest.fail("training started"))
    assert_refused(capsys, "--dataloader_persistent_workers", tmp_path / "out2", "--dataloader_persistent_workers")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_options_from_a_json_or_yaml_file(tmp_path, monkeypatch, capsys, suffix):
    used = {}
    monkeypatch.setattr(Trainer, "train", lambda self, **kwargs: used.setdefault("args", self.args) and 1 / 0)
    options = {"train_files": SOURCE_FILES, "preset": "tiny", "vocab_size": VOCAB_SIZE, "seq_len": SEQ_LEN,
               "eval_fraction": 0, "optim": "adafactor", "learning_rate": 0.001, "max_steps": 3}
    path = tmp_path / f"options{suffix}"
    path.write_text(json.dumps(options))  # JSON is YAML too
    with pytest.raises(ZeroDivisionError):
        cli_main(["train", "--args_file", str(path), "--output_dir", str(tmp_path / "out"), "--learning_rate", "0.002"])
    args = used["args"]
    assert (args.optim, args.max_steps, args.learning_rate) == ("adafactor", 3, 0.002)  # the command line wins
    path.write_text(json.dumps({**options, "no_such_option": 1}))
    with pytest.raises(SystemExit) as exited:
        cli_main(["train", "--args_file", str(path), "--output_dir", str(tmp_path / "out")])
    assert exited.value.code == 2 and "'no_such_option' is not an option of this command" in capsys.readouterr().err


def test_missing_corpus_or_model_is_one_line(no_training, tmp_path, capsys):
    capsys.readouterr()
    assert cli_main(["train", "--preset", "tiny", "--output_dir", str(tmp_path / "out")]) == 2
    assert "one of --train_files or --dataset is required" in capsys.readouterr().err
    assert cli_main(["train", "--train_files", *SOURCE_FILES, "--output_dir", str(tmp_path / "out")]) == 2
    assert "one of --preset, --config or --model_name_or_path is required" in capsys.readouterr().err


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "diffuapriel_hf.training.train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--resume_from_checkpoint" in result.stdout and "--preset" in result.stdout
