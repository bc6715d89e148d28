"""Hub folders: the remote code (the repository's modeling/ folder, held once), save_pretrained / save_for_hub, loading with
trust_remote_code=True where diffuapriel_hf cannot be imported (the model and its text-generation pipeline), and what
loading refuses."""

import json
import pickle
import re
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForMaskedLM, AutoTokenizer
from transformers.dynamic_module_utils import check_imports, get_imports, get_relative_imports

from diffuapriel_hf import DiffuAprielForMaskedLM, preset_config
from diffuapriel_hf.hub import AUTO_MAP, remote_code_files, save_for_hub
from diffuapriel_hf.hub.publish import evaluation_results, model_card, remote_code_requirements

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
        if path.is_symlink():  # a link to one of them (the shipped model's remote code) is no copy
            continue
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
    tokenizer_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tokenizer_config["padding_side"] == "left"
    # The tokenizer needs no code of its own: no auto_map, a class of transformers' own.
    assert "auto_map" not in tokenizer_config and tokenizer_config["tokenizer_class"] == "TokenizersBackend"
    assert AutoTokenizer.from_pretrained(tmp_path).padding_side == "left"
    for path in remote_code_files():
        assert (tmp_path / path.name).read_text() == path.read_text(), path.name
    card = ModelCard.load(tmp_path / "README.md")
    # config.json names the repository's text-generation pipeline, so the card's pipeline is text-generation.
    pipeline_class = "pipeline_diffuapriel.DiffusionTextGenerationPipeline"
    assert config["custom_pipelines"]["text-generation"]["impl"] == pipeline_class
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.license == "apache-2.0"
    assert {"diffuapriel", "masked-diffusion", "mamba2", "custom_code"} <= set(card.data.tags)
    assert f"{model.num_parameters():,}" in card.text and "2: 2 bidirectional Mamba-2" in card.text
    assert 'from_pretrained("someone/diffuapriel-tiny", trust_remote_code=True)' in card.text
    assert 'pipeline("text-generation", model="someone/diffuapriel-tiny", trust_remote_code=True)' in card.text
    for heading in ("## Intended use", "## Limitations", "## Citation"):
        assert heading in card.text, heading
    assert "[arXiv 2511.15927](https://arxiv.org/abs/2511.15927)" in card.text
    assert "eprint        = {2511.15927}" in card.text and "archivePrefix = {arXiv}" in card.text
    assert "## Training procedure" not in card.text and "## Evaluation results" not in card.text  # none given
    assert card.data.eval_results is None and card.data.datasets is None


def test_the_card_names_the_packages_the_remote_code_imports():
    # What loading with trust_remote_code=True needs: every distribution that the remote code imports outside the
    # try blocks of optional kernels, at the versions this package declares, and nothing that pip cannot resolve.
    requirements = remote_code_requirements()
    imported = {name for path in remote_code_files() for name in get_imports(path)} - set(sys.stdlib_module_names)
    assert imported == {"torch", "transformers", "safetensors", "huggingface_hub"}
    names = [re.split(r"[<>=!~]", requirement)[0] for requirement in requirements]
    assert sorted(names) == sorted(imported)
    assert "transformers<6,>=5.17" in requirements or "transformers>=5.17,<6" in requirements
    card = model_card(DiffuAprielForMaskedLM(preset_config("tiny")))
    assert "pip install " + " ".join(f"'{r}'" for r in requirements) in card.text
    assert "pip install diffuapriel-hf" not in card.text


def test_card_metadata_model_index_and_sections(model, tmp_path):
    trainer_metrics = tmp_path / "eval_results.json"  # as diffuapriel train writes it
    trainer_metrics.write_text(json.dumps({"epoch": 1.0, "eval_loss": 3.95, "eval_bits_per_token": 5.70,
                                           "eval_perplexity_bound": 51.9, "eval_runtime": 2.0}))
    lm_eval = tmp_path / "results.json"  # as lm-evaluation-harness writes it (diffuapriel eval --output_path)
    lm_eval.write_text(json.dumps({"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.31,
                                                            "acc_stderr,none": 0.01, "acc_norm,none": 0.29}}}))
    results = evaluation_results(trainer_metrics, dataset_name="Python standard library") + evaluation_results(lm_eval)
    card = model_card(model, "someone/diffuapriel-tiny", base_model="state-spaces/mamba2-130m",
                      datasets=["codeparrot/github-code"], language=["en", "code"], eval_results=results,
                      training_procedure="Four minutes of `diffuapriel train` on two CPU cores.",
                      limitations=["It writes Python-looking code, not correct programs."],
                      example_prompt="class Point:")
    reloaded = ModelCard(str(card))  # the metadata survives its YAML
    assert reloaded.data.license == "apache-2.0" and reloaded.data.datasets == ["codeparrot/github-code"]
    assert reloaded.data.language == ["en", "code"] and reloaded.data.base_model == "state-spaces/mamba2-130m"
    index = reloaded.data.to_dict()["model-index"][0]
    assert index["name"] == "diffuapriel-tiny"
    values = {(result.dataset_name, result.metric_type): result.metric_value for result in reloaded.data.eval_results}
    assert values == {("Python standard library", "bits_per_token"): 5.70,
                      ("Python standard library", "perplexity_bound"): 51.9,
                      ("arc_easy", "acc"): 0.31, ("arc_easy", "acc_norm"): 0.29}
    text = reloaded.text
    assert "## Training procedure\n\nFour minutes of `diffuapriel train` on two CPU cores." in text
    assert "| text-generation | Python standard library (eval) | bits per token (negative ELBO) | 5.7 |" in text
    assert "- It writes Python-looking code, not correct programs." in text
    assert 'tokenizer("class Point:", return_tensors="pt")' in text
    assert "Converted from [`state-spaces/mamba2-130m`]" in text and "(codeparrot/github-code)" in text
    unknown = tmp_path / "other.json"
    unknown.write_text(json.dumps({"eval_loss": 3.95}))
    with pytest.raises(ValueError, match="holds neither lm-evaluation-harness results .* its keys: \\['eval_loss'\\]"):
        evaluation_results(unknown)


def test_model_card_example_runs(model, word_tokenizer, tmp_path, capsys):
    save_for_hub(model, tmp_path, tokenizer=word_tokenizer(model.config), repo_id=str(tmp_path))
    example = ModelCard.load(tmp_path / "README.md").text.split("```python\n")[1].split("```")[0]
    assert "model.generate(" in example
    exec(example, {})
    assert capsys.readouterr().out.strip()  # the decoded generation


def assert_complete_model_upload(files: dict):
    """Weights, config.json with auto_map and the pipeline, generation config, every remote code file unchanged."""
    config = json.loads(files["config.json"])
    assert {"AutoConfig", "AutoModelForMaskedLM"} <= set(config["auto_map"]) and "text-generation" in config[
        "custom_pipelines"]
    assert "model.safetensors" in files and "generation_config.json" in files
    for path in remote_code_files():
        assert files[path.name] == path.read_bytes(), path.name


def test_save_for_hub_pushes_the_complete_folder(model, word_tokenizer, tmp_path, hub):
    with pytest.raises(ValueError, match="push=True needs repo_id"):
        save_for_hub(model, tmp_path / "no-repo", push=True)
    save_for_hub(model, tmp_path / "repo", tokenizer=word_tokenizer(model.config), repo_id="someone/tiny", push=True,
                 private=True)
    assert hub.created == [("someone/tiny", True, True)]
    (repo_id, files), = hub.uploads
    assert repo_id == "someone/tiny"
    assert files == {path.name: path.read_bytes() for path in (tmp_path / "repo").iterdir()}  # the whole folder
    assert_complete_model_upload(files)
    assert {"tokenizer.json", "tokenizer_config.json", "README.md"} <= set(files)
    assert ModelCard(files["README.md"].decode()).data.pipeline_tag == "text-generation"


def test_model_and_tokenizer_push_to_hub_upload_the_model_and_its_code(model, word_tokenizer, hub):
    model.push_to_hub("someone/tiny")
    word_tokenizer(model.config).push_to_hub("someone/tiny")
    assert [repo_id for repo_id, _ in hub.uploads] == ["someone/tiny", "someone/tiny"]
    (_, model_files), (_, tokenizer_files) = hub.uploads
    assert_complete_model_upload(model_files)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(tokenizer_files)


LOAD_WITHOUT_PACKAGE = r"""
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
torch.save({"logits": logits, "generated": generated, "cached": cached, "class": type(model).__module__,
            "piped": piped, "pipeline_class": type(generator).__module__}, outputs)
"""


@pytest.mark.slow
def test_remote_code_loads_where_the_package_cannot_be_imported(tiny_model, word_tokenizer, tmp_path,
                                                                 without_package):
    model = tiny_model("hybrid")  # both kinds of mixer
    save_for_hub(model, tmp_path / "repo", tokenizer=word_tokenizer(model.config))
    ids = torch.randint(3, model.config.vocab_size - 1, (2, 7))
    torch.save(ids, tmp_path / "ids.pt")
    result = without_package(LOAD_WITHOUT_PACKAGE, tmp_path / "repo", tmp_path / "ids.pt", tmp_path / "out.pt",
                             modules_cache=tmp_path / "modules")
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
