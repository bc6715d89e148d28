"""Faults and misuse: nothing a command writes overwrites a model or a user's file without being told, an interrupted
write leaves the old folder, an interrupted run resumes to exactly the uninterrupted one, damaged checkpoints are
named, and corpus text that spells a special token trains as text. Tiny models on the CPU."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoTokenizer, Trainer

from diffuapriel_hf import DiffuAprielForMaskedLM, preset_config
from diffuapriel_hf.cli import main as cli_main
from diffuapriel_hf.hub import save_for_hub
from test_conversion import random_mamba2, tiny_tokenizer
from test_training import SOURCE_FILES, train_command

pytestmark = pytest.mark.usefixtures("one_thread")

HAND_WRITTEN = "# My model\n\nWritten by hand.\n"


def snapshot(folder) -> dict:
    """Every file under `folder` (relative path -> sha256 of its bytes)."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, folder)] = hashlib.sha256(handle.read()).hexdigest()
    return found


def last_error(capsys) -> str:
    """The command's last message on stderr (progress bars aside)."""
    lines = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line.startswith("diffuapriel")]
    return lines[-1] if lines else ""


def leftovers(folder) -> list[str]:
    """Staging or retired folders left beside `folder`."""
    parent, name = os.path.split(os.path.abspath(folder))
    return [entry for entry in os.listdir(parent) if entry.startswith(f".{name}.")]


# Conversion and save_for_hub.

@pytest.fixture
def source(tmp_path):
    random_mamba2().save_pretrained(tmp_path / "source")
    tiny_tokenizer().save_pretrained(tmp_path / "source")
    return tmp_path / "source"


@pytest.fixture
def occupied(tmp_path):
    """A folder holding a hand-written card, a user's notes, and an older model's config and BPE tokenizer files."""
    folder = tmp_path / "occupied"
    folder.mkdir()
    (folder / "README.md").write_text(HAND_WRITTEN)
    (folder / "notes.txt").write_text("keep me")
    (folder / "config.json").write_text(json.dumps({"model_type": "older"}))
    (folder / "vocab.json").write_text("{}")
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def test_convert_into_an_occupied_folder_refuses_unless_told(source, occupied, capsys):
    before = snapshot(occupied)
    assert cli_main(["convert", str(source), str(occupied)]) == 2
    error = last_error(capsys)
    assert error.startswith("diffuapriel convert: error: ") and "--overwrite" in error and "README.md" in error
    assert snapshot(occupied) == before

    assert cli_main(["convert", str(source), str(occupied), "--overwrite"]) == 0
    after = snapshot(occupied)
    # The model is replaced as a whole (the older tokenizer's files go with it); the user's files stay as they were.
    assert after["README.md"] == before["README.md"] and after["notes.txt"] == before["notes.txt"]
    assert "vocab.json" not in after and "merges.txt" not in after and after["config.json"] != before["config.json"]
    assert AutoTokenizer.from_pretrained(occupied).mask_token == "<|mask|>"
    assert isinstance(AutoModelForMaskedLM.from_pretrained(occupied), DiffuAprielForMaskedLM)
    assert leftovers(occupied) == []


def test_convert_onto_its_own_source_refuses(source, capsys):
    before = snapshot(source)
    assert cli_main(["convert", str(source), str(source / "."), "--overwrite"]) == 2
    assert "is the source folder" in last_error(capsys)
    assert snapshot(source) == before


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return DiffuAprielForMaskedLM(preset_config("tiny")).eval()


def test_save_for_hub_keeps_a_hand_written_card_unless_told(tiny, occupied):
    with pytest.raises(ValueError, match="already holds files .*overwrite=True"):
        save_for_hub(tiny, occupied)
    save_for_hub(tiny, occupied, overwrite=True)
    assert (occupied / "README.md").read_text() == HAND_WRITTEN and (occupied / "model.safetensors").is_file()
    save_for_hub(tiny, occupied, overwrite=True, overwrite_model_card=True)
    assert (occupied / "README.md").read_text().startswith("---\nlibrary_name: transformers")
    assert (occupied / "notes.txt").read_text() == "keep me"


def test_an_interrupted_save_leaves_the_old_folder(tiny, occupied, monkeypatch):
    save_for_hub(tiny, occupied, overwrite=True)
    before = snapshot(occupied)

    def cut_short(self, folder, *args, **kwargs):
        (folder / "README.md").write_text("half")  # something of the new folder is already written
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tiny), "save_pretrained", cut_short)
    with pytest.raises(KeyboardInterrupt):
        save_for_hub(tiny, occupied, overwrite=True, overwrite_model_card=True)
    assert snapshot(occupied) == before and leftovers(occupied) == []


# Training into an occupied folder, special tokens in the corpus.

def test_train_never_replaces_a_model_or_deletes_checkpoints_unless_told(tmp_path, capsys):
    output = tmp_path / "run"
    assert train_command(output, "--max_steps", "2", "--eval_fraction", "0") == 0
    before = snapshot(output)
    assert "model.safetensors" in before and "checkpoint-2/trainer_state.json" in before
    assert train_command(output, "--max_steps", "2", "--eval_fraction", "0", "--seed", "1") == 2
    error = last_error(capsys)
    assert "--output_dir" in error and "--overwrite_output_dir" in error and "--resume_from_checkpoint last" in error
    assert snapshot(output) == before

    (output / "notes.txt").write_text("keep me")
    assert "## Training procedure" in (output / "README.md").read_text()  # the card the run wrote
    (output / "README.md").write_text("a hand-written card")
    assert train_command(output, "--max_steps", "2", "--eval_fraction", "0", "--seed", "1",
                         "--overwrite_output_dir") == 0
    after = snapshot(output)
    assert after["model.safetensors"] != before["model.safetensors"] and after["notes.txt"]
    assert (output / "README.md").read_text() == "a hand-written card"
    assert leftovers(output) == []


def test_corpus_spelling_every_special_token_trains_as_text(tmp_path):
    with open(SOURCE_FILES[0], encoding="utf-8") as handle:
        text = handle.read()
    specials = "<|endoftext|> <|pad|> <|mask|>"
    corpus = tmp_path / "specials.py"
    corpus.write_text("\n".join(f"# {specials} {line}" for line in text.splitlines()))
    output = tmp_path / "run"
    assert train_command(output, "--max_steps", "2", "--eval_fraction", "0.05", files=[str(corpus)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(output)
    ids = tokenizer(specials, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert not set(ids) & set(tokenizer.all_special_ids)
    assert tokenizer.decode(ids) == specials


def test_a_tokenizer_that_gives_the_mask_token_for_text_is_refused_with_the_place(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Trainer, "train", lambda *a, **k: pytest.fail("training started"))
    from diffuapriel_hf.training.train import read_text_files, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(read_text_files(SOURCE_FILES), 320)
    tokenizer.mask_token = "x"  # an ordinary token of the vocabulary, which text spells
    assert tokenizer.mask_token_id not in (None, tokenizer.eos_token_id, tokenizer.pad_token_id)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    corpus = tmp_path / "code.py"
    corpus.write_text("y = 1\n" * 200 + "def f():\n    return x\n")
    assert train_command(tmp_path / "run", "--max_steps", "1", "--eval_fraction", "0", "--vocab_size", "320",
                         "--tokenizer", str(tmp_path / "tokenizer"), files=[str(corpus)]) == 2
    error = last_error(capsys)
    assert error.startswith(f"diffuapriel train: error: {corpus}: line 202, column 12 tokenizes to the mask token")


# Interruptions and resumption.

RUN = ("--max_steps", "20", "--eval_fraction", "0", "--logging_steps", "1", "--save_steps", "100",
       "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "2", "--dataloader_num_workers", "1")


def logged_losses(checkpoint) -> list[tuple[int, float]]:
    with open(checkpoint / "trainer_state.json") as handle:
        return [(entry["step"], entry["loss"]) for entry in json.load(handle)["log_history"] if "loss" in entry]


def signal_at_step(monkeypatch, step: int, signum=signal.SIGINT):
    """Send this process `signum` once, during optimizer step `step` (1-based), as Ctrl-C or a scheduler would."""
    original = Trainer.training_step
    sent = []

    def training_step(self, *args, **kwargs):
        if self.state.global_step == step - 1 and not sent:
            sent.append(signum)
            os.kill(os.getpid(), signum)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", training_step)


def test_a_run_stopped_by_ctrl_c_and_resumed_is_the_uninterrupted_run(tmp_path, monkeypatch, capsys):
    # Gradient accumulation and a dataloader worker: the noise must not depend on how batches were drawn.
    assert train_command(tmp_path / "whole", *RUN) == 0
    with monkeypatch.context() as patch:
        signal_at_step(patch, 10)
        assert train_command(tmp_path / "parts", *RUN) == 128 + signal.SIGINT
    error = last_error(capsys)
    assert "stopped by SIGINT after step 10: saved" in error and "--resume_from_checkpoint last" in error
    assert not (tmp_path / "parts" / "model.safetensors").exists()  # no final model from a stopped run
    assert train_command(tmp_path / "parts", *RUN, "--resume_from_checkpoint", "last") == 0

    whole = logged_losses(tmp_path / "whole" / "checkpoint-20")
    parts = logged_losses(tmp_path / "parts" / "checkpoint-20")
    assert [step for step, _ in parts] == list(range(1, 21))
    assert parts == whole  # the same losses, step for step, to the last bit
    for name, tensor in load_file(tmp_path / "whole" / "model.safetensors").items():
        assert torch.equal(load_file(tmp_path / "parts" / "model.safetensors")[name], tensor), name


def test_a_save_cut_short_is_skipped_on_resume(tmp_path, monkeypatch, capsys):
    run = ("--max_steps", "4", "--save_steps", "2", "--eval_fraction", "0")
    original = Trainer._save_rng_state

    def fail_at_step_4(self, output_dir):  # after the weights and optimizer, before trainer_state.json
        if self.state.global_step == 4:
            raise OSError("No space left on device")
        return original(self, output_dir)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_save_rng_state", fail_at_step_4)
        with pytest.raises(OSError, match="No space left"):
            train_command(tmp_path / "run", *run)
    assert (tmp_path / "run" / "checkpoint-4" / "model.safetensors").is_file()
    capsys.readouterr()
    assert train_command(tmp_path / "run", *run, "--resume_from_checkpoint", "last") == 0
    assert "checkpoint-4, an incomplete checkpoint (no trainer_state.json)" in capsys.readouterr().err
    assert [step for step, _ in logged_losses(tmp_path / "run" / "checkpoint-4")] == [1, 2, 4]  # logging_steps 2


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    output = tmp_path_factory.mktemp("checkpointed")
    assert train_command(output, "--max_steps", "2", "--save_steps", "2", "--eval_fraction", "0") == 0
    return output


def damage(path, offset: int, data: bytes):
    with open(path, "r+b") as handle:
        handle.seek(offset if offset >= 0 else os.path.getsize(path) + offset)
        handle.write(data)


@pytest.mark.parametrize("file, offset, data, message", [
    ("model.safetensors", 0, b"\xff" * 8, "model.safetensors cannot be read"),
    ("model.safetensors", -64, b"\xff" * 64, "model.safetensors holds values that are not finite"),
    ("optimizer.pt", -4096, b"\x00\x01" * 64, "optimizer.pt (cannot be read|is damaged)"),
    ("rng_state.pth", 100, b"garbage", "rng_state.pth (cannot be read|is damaged)"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_file(checkpointed, tmp_path, capsys, file, offset, data, message):
    output = tmp_path / "run"
    os.makedirs(output)
    subprocess.run(["cp", "-r", str(checkpointed / "checkpoint-2"), str(output)], check=True)
    damage(output / "checkpoint-2" / file, offset, data)
    capsys.readouterr()
    assert train_command(output, "--max_steps", "4", "--eval_fraction", "0", "--resume_from_checkpoint", "last") == 2
    error = last_error(capsys)
    assert error.startswith("diffuapriel train: error: ") and re.search(message, error), error


def test_sigterm_stops_a_training_process_with_a_checkpoint(tmp_path):
    """A real process and a real signal, as a cluster scheduler sends one."""
    output, log = tmp_path / "run", tmp_path / "log.txt"
    command = [sys.executable, "-m", "diffuapriel_hf.training.train", "--train_files", *SOURCE_FILES, "--preset",
               "tiny", "--vocab_size", "320", "--seq_len", "32", "--output_dir", str(output), "--max_steps", "100000",
               "--save_steps", "100000", "--eval_fraction", "0", "--logging_steps", "1"]
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ,
                                                                                          "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while "'loss'" not in log.read_text() and process.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-2000:]
    stopped = log.read_text().strip().splitlines()[-1]
    assert stopped.startswith("diffuapriel train: stopped by SIGTERM after step "), stopped
    step = int(stopped.split("after step ")[1].split(":")[0])
    assert logged_losses(output / f"checkpoint-{step}")[-1][0] == step


def test_damage_the_format_cannot_tell_loads_with_finite_logits(checkpointed, tmp_path):
    """safetensors keeps no checksum: finite bytes written over a weight load; the model still computes."""
    output = tmp_path / "checkpoint-2"
    subprocess.run(["cp", "-r", str(checkpointed / "checkpoint-2"), str(output)], check=True)
    damage(output / "model.safetensors", -4096, torch.full((256,), 0.5).numpy().tobytes())
    model = AutoModelForMaskedLM.from_pretrained(output)
    ids = torch.randint(0, model.config.mask_token_id, (2, 16))
    assert torch.isfinite(model(ids).logits).all()
