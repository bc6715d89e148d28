"""README.md runs as written: every ```python block (in order, in one namespace, as a reader pastes them), every
```bash command and every `diffuapriel ...` command quoted in the text, in a scratch folder.

Stated exceptions and reductions, each applied by name below (SKIPPED, REDUCED):
- `pip install ...`: the package is installed where this suite runs; skipped.
- `python3 -m pytest ...`: this suite itself; skipped.
- `accelerate launch --multi_gpu ...`: needs several GPUs; skipped.
- `diffuapriel train ...`: the same command on the `tiny` preset, a 320-token vocabulary, 32-token sequences, two
  optimizer steps, four standard-library files as `data/*.txt`, in float32 (no --bf16 on the CPU).
- `diffuapriel convert path/to/mamba2-checkpoint ...`: on a tiny random transformers Mamba-2 checkpoint saved there.
- `diffuapriel eval ...`: lm-eval's tasks download their data; the local tasks of tests/eval_tasks instead, two
  documents each, two samples per likelihood.
"""

import os
import re
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Optional

import pytest
import torch
from transformers import Mamba2Config, Mamba2ForCausalLM

from conftest import run_at_once

README = Path(__file__).parents[1] / "README.md"
TEXT = README.read_text()
SKIPPED = {
    "pip install": "the package is installed where the suite runs",
    "python3 -m pytest": "this suite itself",
    "accelerate launch": "needs several GPUs",
}
EVAL_TASKS = Path(__file__).parent / "eval_tasks"
REDUCED = {  # flag -> the value it takes here (None: dropped)
    "diffuapriel train": {"--preset": "tiny", "--vocab_size": "320", "--seq_len": "32", "--bf16": None},
    "diffuapriel eval": {"--tasks": "stdlib_next_line,stdlib_perplexity,stdlib_complete_line"},
}
REDUCED_EXTRA = {"diffuapriel train": ["--max_steps", "2", "--per_device_train_batch_size", "4",
                                       "--eval_fraction", "0.2", "--elbo_samples", "1"],
                 "diffuapriel eval": ["--include_path", str(EVAL_TASKS), "--limit", "2", "--model_args",
                                      "num_samples=2"]}


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)


def shell_commands() -> list[str]:
    """The commands of the ```bash blocks (continuation lines joined, comments dropped, `&&` chains split) and the
    `diffuapriel ... --option ...` commands quoted in the text."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", TEXT, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            commands += [part.strip() for part in line.split(" && ") if part.strip()]
    prose = re.sub(r"```.*?```", "", TEXT, flags=re.S)
    quoted = re.findall(r"`(diffuapriel [^`]+)`", prose)  # commands with options, not names or quoted errors
    return commands + [command for command in quoted if " --" in command and "error:" not in command]


def reduced(command: str) -> str:
    """`command` at the stated reduced sizes: each reduced flag's value replaced (or the flag dropped), the extra
    flags appended (the last of a repeated flag wins)."""
    for prefix, values in REDUCED.items():
        if not command.startswith(prefix):
            continue
        for flag, value in values.items():
            if value is None:
                command = re.sub(rf"\s{flag}(?=\s|$)", "", command)
            else:
                command = re.sub(rf"{flag}\s+\S+", f"{flag} {value}", command)
        command = " ".join([command, *REDUCED_EXTRA[prefix]])
    return command


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A scratch folder with what the README's commands read: text files, a Mamba-2 checkpoint."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "data").mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "string.py", "bisect.py", "heapq.py"):
        shutil.copy(stdlib / name, folder / "data" / f"{name}.txt")
    torch.manual_seed(0)
    config = Mamba2Config(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, state_size=8,
                          n_groups=1, chunk_size=8, expand=2, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    Mamba2ForCausalLM(config).save_pretrained(folder / "path" / "to" / "mamba2-checkpoint")
    return folder


def test_the_readme_has_its_examples():
    assert len(python_blocks()) >= 2 and any(c.startswith("diffuapriel generate") for c in shell_commands())


def test_python_blocks_run_in_order(tmp_path, monkeypatch, hub):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in python_blocks():
        exec(compile(block, str(README), "exec"), namespace)
    # The Hub is the recorder (conftest.py): each push the README makes is an upload of what it names.
    pushed = re.findall(r'(?:push_to_hub\(|repo_id=)"([^"]+)"', "".join(python_blocks()))
    assert pushed and [repo_id for repo_id, _ in hub.uploads] == pushed


def not_run(command: str) -> Optional[str]:
    """Why the suite does not run `command`, or None where it does."""
    skip = next((why for prefix, why in SKIPPED.items() if command.startswith(prefix)), None)
    if skip:
        return f"{command.split()[0]} ...: {skip}"
    return "an elided command line" if "..." in command.split() else None


@pytest.fixture(scope="module")
def command_results(request, scratch) -> dict:
    """The completed process of each command that the session's tests of the shell commands run, by command: two at a
    time, in the scratch folder (none of them reads what another writes). Most of each is a fresh interpreter
    importing torch and transformers on one core: two use both of CI's cores."""
    commands = [item.callspec.params["command"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_shell_commands_run"]
    bin_dir = os.path.dirname(sys.executable)  # where the installed `diffuapriel` script lives
    variables = dict(PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), TOKENIZERS_PARALLELISM="false")
    to_run = list(dict.fromkeys(command for command in commands if not not_run(command)))  # each once
    runs = [(["bash", "-c", reduced(command)], scratch, variables) for command in to_run]
    return dict(zip(to_run, run_at_once(*runs, timeout=600, at_most=2)))


@pytest.mark.parametrize("command", shell_commands())
def test_shell_commands_run(command, command_results):
    if why := not_run(command):
        pytest.skip(why)
    result = command_results[command]
    assert result.returncode == 0, result.stderr[-3000:]
