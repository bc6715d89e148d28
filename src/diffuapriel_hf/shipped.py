"""Where the model shipped inside the package lies: an 8M-parameter DiffuApriel trained on the Python standard library
(benchmarks/default_model/README.md), which `diffuapriel generate` uses without `--model`."""

from importlib.resources import files

__all__ = ["default_model_path"]


def default_model_path() -> str:
    """The folder of the shipped model, for `from_pretrained` (model and tokenizer)."""
    return str(files("diffuapriel_hf") / "default_model")
