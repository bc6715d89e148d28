"""Hub folders: the remote code (the repository's modeling/ folder, held once), save_pretrained / save_for_hub, loading with
trust_remote_code=True where diffuapriel_hf cannot be imported (the model and its text-generation pipeline), and what
loading refuses."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForMaskedLM, AutoTokenizer
from transformers.dynamic_module_utils import check_imports, get_imports, get_relative_imports

from diffuapriel_hf import DiffuAprielForMaskedLM
from diffuapriel_hf.hub import AUTO_MAP, remote_code_files, save_for_hub

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model()


def test_remote_code_is_the_modeling_folder_held_once():
    files = remote_code_files()
    assert {path.parent for path in files} == {REPO / "modeling"}
    names = {path.name for path in files}
    assert {"configuration_diffuapriel.py", "modeling_diffuapriel.py", "mamba_ops.py", "diffusion.py",
            "generation.py"} <= names
    # No Python file in the repository is a whole copy of another.
    texts = {}
    for path in sorted(REPO.glob("[!.]*/**/*.py")):
        text = path.read_text(encoding="utf-8")
        assert text not in texts, f"{path} repeats {texts[text]}"
        texts[text] = path


def test_remote_code_is_self_contained():
    names = {path.name for path in remote_code_files()}
    for path in remote_code_files():
        # Relative imports only among the runtime's own files, no import of the package by name, and every other
        # import installed here (the optional kernels, absent here, must be imported inside `try`).
        assert {f"{module}.py" for module in get_relative_imports(path)} <= names, path.name
        assert "diffuapriel_hf" not in get_imports(path), path.name
        check_imports(path)


def test_save_pretrained_writes_remote_code(model, tmp_path):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoConfig"] == AUTO_MAP["AutoConfig"]
    assert config["auto_map"]["AutoModelForMaskedLM"] == AUTO_MAP["AutoModelForMaskedLM"]
    for path in remote_code_files():
        assert (tmp_path / path.name).read_text() == path.read_text(), path.name


def test_save_for_hub_writes_a_complete_repo(model, word_tokenizer, tmp_path):
    tokenizer = word_tokenizer(model.config)
    save_for_hub(model, tmp_path, tokenizer=tokenizer, repo_id="someone/diffuapriel-tiny")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    for name in ("model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).is_file(), name
    # The word tokenizer pads on the right; the saved one pads on the left, as generate() needs.
    assert word_tokenizer(model.config).padding_side == "right"
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["padding_side"] == "left"
    assert AutoTokenizer.from_pretrained(tmp_path).padding_side == "left"
    for path in remote_code_files():
        assert (tmp_path / path.name).read_text() == path.read_text(), path.name
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "fill-mask"
    assert {"diffuapriel", "masked-diffusion", "mamba2", "custom_code"} <= set(card.data.tags)
    assert f"{model.num_parameters():,}" in card.text and "2: 2 bidirectional Mamba-2" in card.text
    assert 'from_pretrained("someone/diffuapriel-tiny", trust_remote_code=True)' in card.text


def test_model_card_example_runs(model, word_tokenizer, tmp_path, capsys):
    save_for_hub(model, tmp_path, tokenizer=word_tokenizer(model.config), repo_id=str(tmp_path))
    example = ModelCard.load(tmp_path / "README.md").text.split("```python\n")[1].split("```")[0]
    assert "model.generate(" in example
    exec(example, {})
    assert capsys.readouterr().out.strip()  # the decoded generation


LOAD_WITHOUT_PACKAGE = r"""
import sys


class BlockPackage:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "diffuapriel_hf":
            raise ImportError("diffuapriel_hf is blocked in this process")


sys.meta_path.insert(0, BlockPackage())
import torch
from transformers import AutoModelForMaskedLM, pipeline

folder, inputs, outputs = sys.argv[1:]
model = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True).eval()
ids = torch.load(inputs)
with torch.no_grad():
    logits = model(ids).logits
generated = model.generate(ids, max_new_tokens=6, steps=6, seed=0)
cached = model.generate(ids, max_new_tokens=6, steps=6, block_length=3, use_block_cache=True, seed=0)
generator = pipeline("text-generation", model=folder, trust_remote_code=True)
piped = generator("w3 w4 w5", max_new_tokens=6, steps=6, seed=0, return_tensors=True)[0]["generated_token_ids"]
if any(name.split(".")[0] == "diffuapriel_hf" for name in sys.modules):
    raise RuntimeError("diffuapriel_hf was imported")
torch.save({"logits": logits, "generated": generated, "cached": cached, "class": type(model).__module__,
            "piped": piped, "pipeline_class": type(generator).__module__}, outputs)
"""


@pytest.mark.slow
def test_remote_code_loads_where_the_package_cannot_be_imported(tiny_model, word_tokenizer, tmp_path):
    model = tiny_model("hybrid")  # both kinds of mixer
    save_for_hub(model, tmp_path / "repo", tokenizer=word_tokenizer(model.config))
    ids = torch.randint(3, model.config.vocab_size - 1, (2, 7))
    torch.save(ids, tmp_path / "ids.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PACKAGE, str(tmp_path / "repo"), str(tmp_path / "ids.pt"),
         str(tmp_path / "out.pt")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    remote = torch.load(tmp_path / "out.pt")
    assert remote["class"].startswith("transformers_modules.")
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"], model(ids).logits, rtol=0, atol=0)
    assert torch.equal(remote["generated"], model.generate(ids, max_new_tokens=6, steps=6, seed=0))
    assert torch.equal(remote["cached"], model.generate(ids, max_new_tokens=6, steps=6, block_length=3,
                                                        use_block_cache=True, seed=0))
    assert remote["pipeline_class"].startswith("transformers_modules.")  # the pipeline, from the folder's code too
    prompt = word_tokenizer(model.config)("w3 w4 w5", return_tensors="pt").input_ids
    assert remote["piped"] == model.generate(prompt, max_new_tokens=6, steps=6, seed=0)[0].tolist()


def test_weights_of_the_wrong_shape_are_named(model, tmp_path):
    from safetensors.torch import load_file, save_file

    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.1.mixer.left_to_right.dt_bias"] = torch.zeros(3)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    pattern = r"model\.layers\.1\.mixer\.left_to_right\.dt_bias has shape \(3,\) in the checkpoint but \(8,\)"
    with pytest.raises(ValueError, match=pattern):
        AutoModelForMaskedLM.from_pretrained(tmp_path)
    loaded = DiffuAprielForMaskedLM.from_pretrained(tmp_path, ignore_mismatched_sizes=True)
    assert loaded.model.layers[1].mixer.left_to_right.dt_bias.shape == (8,)


class RunsCode:
    """Unpickling this calls `open(path, "w")`: a checkpoint that would run code when loaded unsafely."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickle_checkpoint_never_runs_code(model, tmp_path):
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    sentinel = tmp_path / "code_ran"
    torch.save({**model.state_dict(), "model.norm.weight": RunsCode(sentinel)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        DiffuAprielForMaskedLM.from_pretrained(tmp_path)
    assert not sentinel.exists()


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_corrupt_weights_are_a_clear_error(model, tmp_path, damage):
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a safetensors file")
    with pytest.raises(ValueError, match=f"checkpoint '{tmp_path}' cannot be read: a safetensors file is corrupt"):
        DiffuAprielForMaskedLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        AutoModelForMaskedLM.from_pretrained(str(tmp_path), ignore_mismatched_sizes=True)
