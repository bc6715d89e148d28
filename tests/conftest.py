"""Fixtures shared by the test modules: tiny models of the three stacks (all Mamba, hybrid, all attention), a
word-level tokenizer over the tiny preset's vocabulary, a Python process in which diffuapriel_hf cannot be
imported, commands run at once, the test modules' checks run under Triton's interpreter, and a stand-in for the Hub
that records uploads."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, RepoUrl
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from diffuapriel_hf import DiffuAprielForMaskedLM, preset_config
from diffuapriel_hf.modeling.configuration_diffuapriel import ATTENTION, MAMBA

# The three stacks: DiffuApriel (all Mamba), DiffuApriel-H (hybrid) and DiffuTran (all attention).
STACK_KINDS = ("mamba", "hybrid", "attention")


def stack_layer_types(kind: str, num_layers: int = 2) -> list[str]:
    """The layer types of a stack of `num_layers`; the hybrid's attention layers are every second one, from the
    second (two layers: Mamba then attention; three: attention between two Mamba layers)."""
    if kind not in STACK_KINDS:
        raise ValueError(f"kind must be one of {STACK_KINDS}, got {kind!r}")
    if kind == "hybrid":
        return [ATTENTION if i % 2 else MAMBA for i in range(num_layers)]
    return [ATTENTION if kind == "attention" else MAMBA] * num_layers


def build_tiny_config(kind="mamba", num_layers=2, **overrides):
    """The tiny preset with the layers of `kind`: a stack's name (see `stack_layer_types`), or the list of layer
    types itself."""
    layer_types = stack_layer_types(kind, num_layers) if isinstance(kind, str) else list(kind)
    return preset_config("tiny", num_hidden_layers=len(layer_types), layer_types=layer_types, **overrides)


def build_tiny_model(kind="mamba", num_layers=2, seed=0, sharpen=None, **overrides):
    """A tiny random model in eval mode, its weights drawn after `torch.manual_seed(seed)`. `sharpen` multiplies the
    (untied) LM head so that the predictions are confident, as a trained model's are (a random tiny model predicts
    nearly uniformly)."""
    if sharpen is not None:
        overrides["tie_word_embeddings"] = False
    torch.manual_seed(seed)
    model = DiffuAprielForMaskedLM(build_tiny_config(kind, num_layers, **overrides)).eval()
    if sharpen is not None:
        with torch.no_grad():
            model.lm_head.weight.mul_(sharpen)
    return model


def build_word_tokenizer(config) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a tiny config's vocabulary: [PAD] [BOS] [EOS] w3 ... w94 [MASK], each special token
    at the config's id."""
    vocab = {"[PAD]": config.pad_token_id, "[BOS]": config.bos_token_id, "[EOS]": config.eos_token_id}
    vocab.update({f"w{i}": i for i in range(3, config.mask_token_id)})
    vocab["[MASK]"] = config.mask_token_id
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", mask_token="[MASK]"
    )


def run_at_once(*runs: tuple, timeout: float = 900, at_most: Optional[int] = None) -> list:
    """Each (command, folder, environment variables) run in its folder with those variables added to this process's,
    at most `at_most` at a time (None: all at once): their completed processes, in order. Each is waited on by a
    thread of its own, which reads its output as it comes (a full pipe never stalls one while another is waited on)."""

    def run(command, folder, variables) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=folder, env=dict(os.environ, **variables), capture_output=True, text=True,
                              timeout=timeout)

    with ThreadPoolExecutor(max_workers=at_most or len(runs)) as pool:
        return list(pool.map(lambda arguments: run(*arguments), runs))


@pytest.fixture(scope="session")
def interpreted_runs(request) -> dict:
    """The completed process of `interpreted_checks()` of every test module of the session that asks for
    `interpreted`, by module name: each in a fresh process under Triton's interpreter (TRITON_INTERPRET=1, which Triton
    reads when first imported), all at once. Each process imports the package, then runs every program of its kernels
    in Python, one at a time, tens of seconds on one core: together they use both of CI's cores while the suite
    waits."""
    pytest.importorskip("triton")
    modules = sorted({item.module.__name__ for item in request.session.items
                      if "interpreted" in getattr(item, "fixturenames", ())})
    runs = [([sys.executable, "-c", f"import json, {module} as t; print(json.dumps(t.interpreted_checks()))"],
             Path(__file__).parent, {"TRITON_INTERPRET": "1"}) for module in modules]
    return dict(zip(modules, run_at_once(*runs, timeout=600)))


@pytest.fixture(scope="module")
def interpreted(request, interpreted_runs):
    """The JSON-printable result of this test module's `interpreted_checks()` under Triton's interpreter (see
    `interpreted_runs`)."""
    done = interpreted_runs[request.module.__name__]
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def tiny_model():
    """`build_tiny_model(kind="mamba", num_layers=2, seed=0, sharpen=None, **overrides)`: a tiny random
    model in eval mode."""
    return build_tiny_model


@pytest.fixture(scope="session")
def word_tokenizer():
    """`build_word_tokenizer(config)`: a word-level tokenizer over a tiny config's vocabulary."""
    return build_word_tokenizer


@pytest.fixture(params=STACK_KINDS)
def stack(request):
    """Each of the three stacks' kinds in turn."""
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread is fastest, and does not fight other processes for the two cores. Modules opt
    in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Run first in a process that must not import diffuapriel_hf: any import of it fails.
BLOCK_PACKAGE = r"""
import sys


class BlockPackage:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "diffuapriel_hf":
            raise ImportError("diffuapriel_hf is blocked in this process")


sys.meta_path.insert(0, BlockPackage())
"""


def run_without_package(script: str, *args, modules_cache) -> subprocess.CompletedProcess:
    """Run `script` (with `args` as sys.argv[1:]) in a fresh interpreter where diffuapriel_hf cannot be imported,
    offline, with no standard input (a trust prompt fails at once), transformers' remote code modules cached under
    `modules_cache`; the script fails if it imported diffuapriel_hf anyway."""
    check = '\nif any(n.split(".")[0] == "diffuapriel_hf" for n in sys.modules):\n    raise RuntimeError("imported")\n'
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(modules_cache), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", BLOCK_PACKAGE + script + check, *map(str, args)], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def without_package():
    """`run_without_package(script, *args, modules_cache)`: a script run where diffuapriel_hf cannot be imported."""
    return run_without_package


class HubRecorder:
    """Stands in for the Hub behind `huggingface_hub.HfApi` (no network): records each repo created and, for each upload
    (`upload_folder`, or `create_commit`, which transformers' `push_to_hub` calls), the repo and the bytes of every file
    it would send, read when the call is made (push_to_hub uploads from a temporary folder)."""

    def __init__(self, monkeypatch):
        self.created, self.uploads = [], []
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # anything else that calls out fails
        monkeypatch.setattr(HfApi, "create_repo", self.create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", self.upload_folder)
        monkeypatch.setattr(HfApi, "create_commit", self.create_commit)

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        self.created.append((repo_id, private, exist_ok))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        files = {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}
        self.uploads.append((repo_id, files))

    def create_commit(self, repo_id, operations, **kwargs):
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        self.uploads.append((repo_id, files))


@pytest.fixture
def hub(monkeypatch):
    """A `HubRecorder`: the Hub's create_repo and uploads recorded, nothing sent, huggingface_hub offline."""
    return HubRecorder(monkeypatch)
