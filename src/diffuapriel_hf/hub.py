"""Publishing DiffuApriel models on the Hugging Face Hub.

- The remote-code bundle: the package's model files (the configuration, the modeling module and every module they
  import relatively, found the way transformers finds them) copied flat, each under a "generated, do not edit"
  header. `python -m diffuapriel_hf.hub bundle modeling` writes it to the repository's `modeling/` folder, and a test
  fails when that folder drifts from the package.
- `save_for_hub(model, folder, tokenizer)`: a complete Hub repo: config.json with `auto_map`, safetensors weights,
  generation_config.json, the tokenizer files, the bundle and a model card (README.md with YAML metadata). It loads
  with `AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True)` where `diffuapriel_hf` is not installed.

A plain `model.save_pretrained(folder)` already writes the remote code and the `auto_map`: the package registers its
classes with `register_for_auto_class`, and transformers' `custom_object_save` copies their source files.
"""

import argparse
import sys
from pathlib import Path
from typing import Optional, Union

from transformers.dynamic_module_utils import get_relative_import_files

PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLE_ROOTS = ("configuration_diffuapriel.py", "modeling_diffuapriel.py")
HEADER = (
    "# Generated from src/diffuapriel_hf/{name} by `python -m diffuapriel_hf.hub bundle modeling`: do not edit.\n"
    "# Hub remote code of DiffuApriel: loads with trust_remote_code=True where diffuapriel_hf is not installed.\n"
)
AUTO_MAP = {
    "AutoConfig": "configuration_diffuapriel.DiffuAprielConfig",
    "AutoModel": "modeling_diffuapriel.DiffuAprielModel",
    "AutoModelForMaskedLM": "modeling_diffuapriel.DiffuAprielForMaskedLM",
}


def bundle_files() -> dict[str, str]:
    """File name -> text of every file of the remote-code bundle, as generated from the package now."""
    names = set(BUNDLE_ROOTS)
    for root in BUNDLE_ROOTS:
        names.update(Path(path).name for path in get_relative_import_files(PACKAGE_DIR / root))
    return {name: HEADER.format(name=name) + (PACKAGE_DIR / name).read_text(encoding="utf-8") for name in sorted(names)}


def write_bundle(folder: Union[str, Path]) -> list[Path]:
    """Write the remote-code bundle into `folder` and delete the files an earlier bundle left there that the package no
    longer needs (only files with the generated header). Returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = bundle_files()
    for stale in folder.glob("*.py"):
        if stale.name not in files and stale.read_text(encoding="utf-8").startswith(HEADER.format(name=stale.name)):
            stale.unlink()
    written = []
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
        written.append(folder / name)
    return written


def bundle_drift(folder: Union[str, Path]) -> list[str]:
    """How the Python files of `folder` differ from the bundle generated now: one line per file that differs, is
    missing or should not be there (empty when they agree)."""
    folder = Path(folder)
    expected = bundle_files()
    present = {path.name for path in folder.glob("*.py")}
    drift = [f"{name}: missing" for name in sorted(set(expected) - present)]
    drift += [f"{name}: not generated from the package" for name in sorted(present - set(expected))]
    drift += [
        f"{name}: differs from src/diffuapriel_hf/{name}"
        for name in sorted(present & set(expected))
        if (folder / name).read_text(encoding="utf-8") != expected[name]
    ]
    return drift


def _layer_summary(config) -> str:
    kinds = {"linear_attention": "bidirectional Mamba-2", "full_attention": "bidirectional attention"}
    if not config.bidirectional:
        kinds["linear_attention"] = "causal (left-to-right) Mamba-2"
    counts = {}
    for kind in config.layer_types:
        counts[kinds[kind]] = counts.get(kinds[kind], 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in counts.items())


def _architecture(model) -> dict[str, str]:
    config = model.config
    mlp = f"SwiGLU MLP of width {config.intermediate_size}" if config.intermediate_size else "no MLP"
    rows = {
        "layers": f"{config.num_hidden_layers}: {_layer_summary(config)}",
        "hidden size": f"{config.hidden_size} ({mlp})",
    }
    if "linear_attention" in config.layer_types:
        rows["Mamba-2"] = (f"state {config.mamba_d_state}, head dim {config.mamba_d_head}, "
                           f"expand {config.mamba_expand}, groups {config.mamba_n_groups}")
    if "full_attention" in config.layer_types:
        rows["attention"] = (f"{config.num_attention_heads} heads ({config.num_key_value_heads} key/value), head dim "
                             f"{config.head_dim}, RoPE")
    rows["parameters"] = f"{model.num_parameters():,}"
    rows["vocabulary"] = f"{config.vocab_size} tokens, mask token id {config.mask_token_id}"
    return rows


def model_card(model, repo_id: Optional[str] = None, base_model: Optional[str] = None) -> str:
    """A README.md for the Hub: YAML metadata (library_name, pipeline_tag, tags, base_model), the architecture and
    how to generate."""
    config = model.config
    tags = ["diffuapriel", "masked-diffusion", "diffusion-language-model", "custom_code"]
    if "linear_attention" in config.layer_types:
        tags.append("mamba2")
    if "full_attention" in config.layer_types:
        tags.append("hybrid" if "linear_attention" in config.layer_types else "transformer")
    metadata = ["library_name: transformers", "pipeline_tag: fill-mask", "tags:"] + [f"- {tag}" for tag in tags]
    if base_model:
        metadata.append(f"base_model: {base_model}")
    name = repo_id or "path/to/this/folder"
    return f"""---
{chr(10).join(metadata)}
---

# DiffuApriel

A masked diffusion language model (DiffuApriel, arXiv 2511.15927) whose denoiser is a stack of bidirectional
Mamba-2 blocks (with attention blocks in the hybrid DiffuApriel-H): each token is predicted from the whole sequence,
and text is generated by unmasking, not left to right.{f" Converted from `{base_model}`." if base_model else ""}

## Architecture

| | |
|---|---|
{chr(10).join(f"| {key} | {value} |" for key, value in _architecture(model).items())}

## How to generate

The model code ships with the weights (`trust_remote_code=True`); `pip install diffuapriel-hf` gives the same classes
as a package, and `pip install diffuapriel-hf[cuda]` the Mamba-2 kernels.

```python
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{name}")
model = AutoModelForMaskedLM.from_pretrained("{name}", trust_remote_code=True)
prompt = tokenizer("The capital of France is", return_tensors="pt")
output = model.generate(**prompt, max_new_tokens=64, steps=64, block_length=32, remasking="low_confidence")
print(tokenizer.decode(output[0], skip_special_tokens=True))
```

`generate` runs diffusion sampling: `steps` denoising passes over `max_new_tokens` masked positions, filled block by
block (`block_length`); mask tokens (`tokenizer.mask_token`) left in the prompt are filled in too (infilling).
"""


def save_for_hub(
    model, folder: Union[str, Path], tokenizer=None, repo_id: Optional[str] = None, base_model: Optional[str] = None
) -> Path:
    """Write a complete Hub repo for `model` to `folder` and return the folder."""
    folder = Path(folder)
    model.config.auto_map = dict(AUTO_MAP)  # transformers adds the saved class to it; we name all three
    model.save_pretrained(folder)  # safetensors, config.json, generation_config.json, the source files
    write_bundle(folder)  # the same code, as generated (with the header)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text(model_card(model, repo_id, base_model), encoding="utf-8")
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffuapriel_hf.hub", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    bundle = commands.add_parser("bundle", help="write the remote-code bundle (the repository's modeling/ folder)")
    bundle.add_argument("output", help="folder to write, e.g. modeling")
    args = parser.parse_args(argv)
    for path in write_bundle(args.output):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
