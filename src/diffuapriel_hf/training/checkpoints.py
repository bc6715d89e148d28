"""What a training run may write and where it resumes: the output folder's checks, the choice of a complete
checkpoint, and stopping on Ctrl-C (SIGINT) or SIGTERM at an optimizer step boundary with a checkpoint saved."""

import os
import re
import shutil
import signal
import sys
import threading
import zipfile
from pathlib import Path
from typing import Optional

from safetensors.torch import load_file
from transformers import TrainerCallback

from ..hub.folders import describe, folder_entries

__all__ = ["StopOnSignal", "check_output_dir", "missing_checkpoint_files", "resolve_checkpoint"]

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)\Z")
# A Trainer checkpoint is complete once trainer_state.json is there: Trainer writes it last.
CHECKPOINT_FILES = ("config.json", "trainer_state.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def missing_checkpoint_files(path: str) -> list[str]:
    """The files a complete Trainer checkpoint has and `path` lacks."""
    missing = [name for name in CHECKPOINT_FILES if not os.path.isfile(os.path.join(path, name))]
    if not any(os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES):
        missing.append("model.safetensors")
    return missing


def checkpoints_by_step(output_dir: str) -> list[str]:
    """The checkpoint-N folders of `output_dir`, newest (highest N) first."""
    found = [(int(m.group(1)), name) for name in folder_entries(output_dir) if (m := CHECKPOINT_PATTERN.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found, reverse=True)
            if os.path.isdir(os.path.join(output_dir, name))]


def last_complete_checkpoint(output_dir: str) -> str:
    """The newest complete checkpoint of `output_dir`; the newer incomplete ones (a save cut short) are named on
    stderr as they are skipped."""
    for path in checkpoints_by_step(output_dir):
        missing = missing_checkpoint_files(path)
        if not missing:
            return path
        print(f"--resume_from_checkpoint last: skipping {path}, an incomplete checkpoint (no {', '.join(missing)})",
              file=sys.stderr)
    raise ValueError(f"--resume_from_checkpoint last: {output_dir!r} holds no complete checkpoint-* folder; leave out "
                     "--resume_from_checkpoint to start afresh")


def check_checkpoint_files(path: str) -> None:
    """Refuse a checkpoint whose files are damaged, naming the file: its safetensors files must parse and hold finite
    values only; its torch files (optimizer.pt, scheduler.pt, rng_state.pth, ...), zip archives, must pass their CRC
    check. (A byte changed inside a safetensors tensor that stays finite cannot be told from a trained value.)"""
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if name.endswith(".safetensors"):
            try:
                tensors = load_file(file)
            except Exception as error:  # safetensors raises its own SafetensorError, or OSError
                raise ValueError(f"{file} cannot be read ({error}): the checkpoint is damaged; resume from another "
                                 "one") from error
            broken = [key for key, value in tensors.items() if value.is_floating_point() and not value.isfinite().all()]
            if broken:
                raise ValueError(f"{file} holds values that are not finite ({describe(broken)}): the checkpoint is "
                                 "damaged or its run diverged; resume from an earlier one")
        elif name.endswith((".pt", ".pth", ".bin")):
            try:
                with zipfile.ZipFile(file) as archive:
                    damaged = archive.testzip()
            except Exception as error:  # damage shows as BadZipFile, EOFError, OSError or a UnicodeDecodeError
                raise ValueError(f"{file} cannot be read ({error}): the checkpoint is damaged; resume from another "
                                 "one") from error
            if damaged is not None:
                raise ValueError(f"{file} is damaged (its entry {damaged} fails its checksum); resume from another "
                                 "checkpoint")


def resolve_checkpoint(resume_from_checkpoint: Optional[str], output_dir: str) -> Optional[str]:
    """The checkpoint folder to resume from: None, a folder (which must be complete) or `last`; its files are checked
    for damage (`check_checkpoint_files`)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "last":
        checkpoint = last_complete_checkpoint(output_dir)
    else:
        checkpoint = resume_from_checkpoint
        missing = missing_checkpoint_files(checkpoint)
        if missing:
            raise ValueError(f"--resume_from_checkpoint: {checkpoint!r} is not a complete Trainer checkpoint (no "
                             f"{', '.join(missing)}); name one that is, or pass 'last' for the newest complete one")
    check_checkpoint_files(checkpoint)
    return checkpoint


def check_output_dir(output_dir: str, overwrite: bool, checkpoint: Optional[str]) -> None:
    """Refuse an output folder that holds files, unless the run resumes one of its own checkpoints or
    `--overwrite_output_dir` is given; then an earlier run's checkpoints are removed (Trainer would otherwise delete
    them one by one as it rotates its own, or mix them with them), and said so."""
    entries = folder_entries(output_dir)
    if checkpoint is not None and Path(checkpoint).resolve().parent == Path(output_dir).resolve():
        return
    if entries and not overwrite:
        raise ValueError(
            f"--output_dir {output_dir!r} already holds files ({describe(entries)}): pass --overwrite_output_dir to "
            "replace the model in it, --resume_from_checkpoint last to continue its run, or name another folder"
        )
    earlier = checkpoints_by_step(output_dir)
    if earlier:
        print(f"--overwrite_output_dir: removing the earlier run's {describe([Path(p).name for p in earlier])}",
              file=sys.stderr)
        for path in earlier:
            shutil.rmtree(path)


class StopOnSignal(TrainerCallback):
    """Ctrl-C (SIGINT) and SIGTERM, caught while the block runs: before training, they stop the command at once (a
    `KeyboardInterrupt`); during training, the current optimizer step finishes, a checkpoint is saved and training
    stops (`received` names the signal). A second signal stops at once, without saving."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: Optional[signal.Signals] = None
        self.training = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        first = self.received is None
        self.received = signal.Signals(signum)
        if not (self.training and first):
            raise KeyboardInterrupt

    def on_train_begin(self, args, state, control, **kwargs):
        if self.received is not None:  # a signal that arrived before, if something swallowed its KeyboardInterrupt
            raise KeyboardInterrupt
        self.training = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            # Said here, not in the handler: printing there could interrupt another write to stderr.
            print(f"\n{self.received.name}: saving a checkpoint at step {state.global_step} and stopping (again: "
                  "stop at once, without it)", file=sys.stderr)
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False
