"""The model shipped in the package: it loads, scores held-out standard-library code as recorded, and writes code
that parses."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from diffuapriel_hf import DiffuAprielForMaskedLM, default_model_path
from diffuapriel_hf.cli import main
from diffuapriel_hf.training.evaluation import CODE_PROMPTS, completion_parse_rate, text_bits_per_token
from diffuapriel_hf.hub import AUTO_MAP, remote_code_files
from diffuapriel_hf.modeling.pipeline_diffuapriel import CUSTOM_PIPELINES
from diffuapriel_hf.training.stdlib_corpus import HELD_OUT_MODULES, stdlib_files

RECORD = json.loads((Path(__file__).parents[1] / "benchmarks" / "default_model" / "results.json").read_text())


@pytest.fixture(scope="module")
def shipped():
    path = default_model_path()
    model = DiffuAprielForMaskedLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def test_the_shipped_checkpoint_is_small_and_complete():
    folder = Path(default_model_path())
    assert (folder / "model.safetensors").stat().st_size < 20 * 2**20
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).exists()


def test_held_out_bits_per_token_match_the_record(shipped):
    check = RECORD["heldout_cpu_check"]
    files = {p.name: p for p in stdlib_files("heldout") if p.name in check["files"]}
    hashes = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in files.items()}
    if hashes != check["files"]:
        pytest.skip(f"this Python's held-out files differ from the recorded ones (Python {check['python']})")
    assert {name.removesuffix(".py") for name in files} <= set(HELD_OUT_MODULES)
    model, tokenizer = shipped
    texts = [files[name].read_text(encoding="utf-8") for name in sorted(check["files"])]
    score = text_bits_per_token(model, tokenizer, texts, seq_len=check["seq_len"], num_samples=check["num_samples"])
    assert score["tokens"] == check["tokens"]
    assert score["bits_per_token"] == pytest.approx(check["bits_per_token"], abs=0.01)
    # Far below a uniform guess over the vocabulary (12 bits): the weights really are the trained ones.
    assert score["bits_per_token"] < 7


def test_generated_code_parses_more_often_than_the_stated_rate(shipped):
    model, tokenizer = shipped
    result = completion_parse_rate(model, tokenizer, CODE_PROMPTS, seed=0)
    texts = result["texts"]
    assert all(text.startswith(prompt) and len(text) > len(prompt) + 20 for text, prompt in zip(texts, CODE_PROMPTS))
    assert result["parsed"] >= 3  # stated rate: 3 of 8


def test_generate_command_uses_the_shipped_model(capsys):
    assert main(["generate", "--prompt", "def add(a, b):", "--no-progress", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def add(a, b):") and len(out) > 40


def test_stop_strings_end_the_generation_after_the_block_that_holds_them(shipped):
    model, tokenizer = shipped
    ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    settings = dict(max_new_tokens=32, block_length=8, steps=32, eos_token_id=None)
    free = model.generate(ids, **settings)
    prompt_length = ids.shape[1]
    stop = tokenizer.decode(free[0, prompt_length + 8 : prompt_length + 9])  # the second block's first token
    first_block = tokenizer.decode(free[0, prompt_length : prompt_length + 8])
    if not stop.strip() or stop in first_block:
        pytest.skip("the second block's first token also appears in the first block")
    out = model.generate(ids, stop_strings=[stop], tokenizer=tokenizer, return_dict_in_generate=True, **settings)
    # As an autoregressive model would: the row ends after the token that completes the stop string.
    assert torch.equal(out.sequences[0, : prompt_length + 9], free[0, : prompt_length + 9])
    assert out.sequences[0, prompt_length + 9 :].eq(model.generation_config.pad_token_id).all()
    assert out.num_forward_passes == 16  # checked when the second block is committed: two blocks of eight steps


def test_the_shipped_folder_carries_its_remote_code():
    # Links to the runtime's files in modeling/ (held once): a wheel copies them in, a checkout reads them through.
    folder = Path(default_model_path())
    assert sorted(path.name for path in folder.glob("*.py")) == sorted(path.name for path in remote_code_files())
    for path in remote_code_files():
        assert (folder / path.name).read_bytes() == path.read_bytes(), path.name
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["custom_pipelines"] == CUSTOM_PIPELINES


LOAD_SHIPPED_WITHOUT_PACKAGE = r"""
import json

import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

folder = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
ids = tokenizer("def add(a, b):", return_tensors="pt").input_ids
generated = model.generate(ids, max_new_tokens=8, steps=8, seed=0)[0].tolist()
generator = pipeline("text-generation", model=folder, trust_remote_code=True, dtype=torch.float32)
piped = generator("def add(a, b):", max_new_tokens=8, steps=8, seed=0, return_tensors=True)[0]["generated_token_ids"]
print(json.dumps({"class": type(model).__module__, "tokenizer_class": type(tokenizer).__module__,
                  "generated": generated, "piped": piped}))
"""


@pytest.mark.slow
def test_the_shipped_folder_loads_where_the_package_cannot_be_imported(shipped, tmp_path, without_package):
    result = without_package(LOAD_SHIPPED_WITHOUT_PACKAGE, default_model_path(), modules_cache=tmp_path / "modules")
    assert result.returncode == 0, result.stderr[-4000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote["class"].startswith("transformers_modules.")
    assert remote["tokenizer_class"].startswith("transformers.")  # transformers' own: the tokenizer runs no code
    model, tokenizer = shipped
    expected = model.generate(tokenizer("def add(a, b):", return_tensors="pt").input_ids, max_new_tokens=8, steps=8,
                              seed=0)[0].tolist()
    assert remote["generated"] == expected and remote["piped"] == expected
