"""Publishing DiffuApriel models on the Hugging Face Hub.

`save_for_hub(model, folder, tokenizer)` writes a complete Hub repo: config.json with `auto_map`, safetensors weights,
generation_config.json, the tokenizer files, the model runtime as remote code and a model card (README.md with YAML
metadata); with `push=True` it uploads the folder to the Hub through `huggingface_hub`. It loads with
`AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True)` where `diffuapriel_hf` is not installed.

The remote code is the repository's `modeling/` folder itself (installed as `diffuapriel_hf.modeling`): the package
registers its classes with `register_for_auto_class`, so a plain `model.save_pretrained(folder)` (and so
`model.push_to_hub(repo)`) already copies their source files, and every file they import relatively, next to the
weights.

The model card is `huggingface_hub`'s `ModelCard`, rendered from `model_card_template.md` beside this file with
validated metadata (`ModelCardData`: license, pipeline, tags, datasets, languages, base model, and the evaluation
results as `model-index`).
"""

import importlib.metadata
import json
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from transformers.dynamic_module_utils import get_imports, get_relative_import_files

from ..modeling import configuration_diffuapriel, modeling_diffuapriel
from .folders import describe, folder_entries, writing_folder

__all__ = [
    "AUTO_MAP",
    "elbo_evaluation_results",
    "evaluation_results",
    "model_card",
    "pad_on_the_left",
    "push_folder",
    "remote_code_files",
    "remote_code_requirements",
    "save_for_hub",
]

AUTO_MAP = {
    "AutoConfig": "configuration_diffuapriel.DiffuAprielConfig",
    "AutoModel": "modeling_diffuapriel.DiffuAprielModel",
    "AutoModelForMaskedLM": "modeling_diffuapriel.DiffuAprielForMaskedLM",
}
MODEL_CARD_TEMPLATE = Path(__file__).with_name("model_card_template.md")
PACKAGE_LICENSE = "apache-2.0"  # the package's (pyproject.toml), the default for the weights published with it
DEFAULT_EXAMPLE_PROMPT = "def fibonacci(n):"


def pad_on_the_left(tokenizer) -> None:
    """Make `tokenizer` pad on the left, in memory and in the tokenizer_config.json it saves: `generate()` takes
    left-padded batches (its new tokens follow every prompt at the same positions). `save_pretrained` writes the
    tokenizer's init kwargs, so the setting goes there too."""
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"


def remote_code_files() -> list[Path]:
    """The files a saved model folder carries as remote code: the configuration and modeling modules and every module
    they import relatively, found the way transformers finds them."""
    roots = [Path(configuration_diffuapriel.__file__), Path(modeling_diffuapriel.__file__)]
    found = set(roots)
    for root in roots:
        found.update(Path(path) for path in get_relative_import_files(root))
    return sorted(found)


def remote_code_requirements() -> list[str]:
    """The requirements, as this package declares them, of the distributions the remote code imports (outside the
    `try` blocks of optional kernels): what loading a saved folder with `trust_remote_code=True` needs installed."""
    modules = {name for path in remote_code_files() for name in get_imports(path)} - set(sys.stdlib_module_names)
    distributions = importlib.metadata.packages_distributions()
    needed = {dist.lower().replace("-", "_") for module in modules for dist in distributions.get(module, [module])}
    requirements = []
    for requirement in importlib.metadata.requires("diffuapriel-hf") or []:
        name = requirement.split(";")[0]
        for separator in "<>=!~ [":
            name = name.split(separator)[0]
        if ";" not in requirement and name.lower().replace("-", "_") in needed:
            requirements.append(requirement.replace(" ", ""))
    return requirements


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
    if getattr(config, "block_size", None):
        rows["block diffusion"] = f"blocks of {config.block_size} tokens"
    rows["parameters"] = f"{model.num_parameters():,}"
    rows["vocabulary"] = f"{config.vocab_size} tokens, mask token id {config.mask_token_id}"
    return rows


def _tags(config) -> list[str]:
    tags = ["diffuapriel", "masked-diffusion", "diffusion-language-model", "custom_code"]
    if "linear_attention" in config.layer_types:
        tags.append("mamba2")
    if "full_attention" in config.layer_types:
        tags.append("hybrid" if "linear_attention" in config.layer_types else "transformer")
    return tags


def has_text_generation_pipeline(config) -> bool:
    """Whether a saved config names the repository's text-generation pipeline (`custom_pipelines`, which
    `DiffuAprielForMaskedLM.save_pretrained` writes with the remote code)."""
    return "text-generation" in (getattr(config, "custom_pipelines", None) or {})


def model_card(
    model, repo_id: Optional[str] = None, base_model: Optional[str] = None, *, license: str = PACKAGE_LICENSE,
    datasets: Optional[Sequence[str]] = None, language: Optional[Sequence[str]] = None,
    eval_results: Optional[Sequence[EvalResult]] = None, training_procedure: Optional[str] = None,
    limitations: Sequence[str] = (), example_prompt: str = DEFAULT_EXAMPLE_PROMPT,
) -> ModelCard:
    """The model card (README.md) of a Hub repo for `model`, rendered from `model_card_template.md`: validated
    metadata (license, pipeline_tag text-generation where the config names the repository's pipeline and fill-mask
    otherwise, tags, datasets, languages, base_model, `eval_results` as model-index), the architecture, the packages
    loading needs, how to generate (with `example_prompt`), intended use, limitations (`limitations` adds to the
    general ones), the training procedure (markdown, when given), the evaluation results and the citation."""
    config = model.config
    pipeline = has_text_generation_pipeline(config)
    name = repo_id or "path/to/this/folder"
    card_data = ModelCardData(
        license=license, library_name="transformers", pipeline_tag="text-generation" if pipeline else "fill-mask",
        tags=_tags(config), base_model=base_model, datasets=list(datasets) if datasets else None,
        language=list(language) if language else None, eval_results=list(eval_results) if eval_results else None,
        model_name=name.rstrip("/").split("/")[-1] if eval_results else None,
    )
    denoiser = ("bidirectional attention blocks (DiffuTran)" if "linear_attention" not in config.layer_types
                else "bidirectional Mamba-2 blocks" + (" with attention blocks (DiffuApriel-H)"
                                                       if "full_attention" in config.layer_types else ""))
    return ModelCard.from_template(
        card_data, template_path=str(MODEL_CARD_TEMPLATE), model_name=name.rstrip("/").split("/")[-1] or "DiffuApriel",
        repo_id=name, base_model=base_model, denoiser=denoiser, architecture=_architecture(model),
        install_requirements=" ".join(shlex.quote(r) for r in remote_code_requirements()),
        example_prompt=example_prompt, text_generation_pipeline=pipeline, datasets=list(datasets or ()),
        limitations=list(limitations), training_procedure=training_procedure, eval_results=list(eval_results or ()),
    )


LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
TRAINER_METRICS = {  # the metrics diffuapriel train's evaluation writes to eval_results.json -> their names
    "eval_bits_per_token": "bits per token (negative ELBO)",
    "eval_perplexity_bound": "perplexity bound (from the ELBO)",
}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def elbo_evaluation_results(metrics: dict, dataset_name: str = "held-out text") -> list[EvalResult]:
    """The held-out ELBO among an evaluation's metrics (`eval_bits_per_token`, `eval_perplexity_bound`, as
    `diffuapriel train`'s Trainer reports them) as evaluation results; [] where there are none."""
    return [
        EvalResult(task_type="text-generation", dataset_type="text", dataset_name=dataset_name, dataset_split="eval",
                   metric_type=key.removeprefix("eval_"), metric_name=name, metric_value=metrics[key])
        for key, name in TRAINER_METRICS.items() if _number(metrics.get(key))
    ]


def evaluation_results(path: Union[str, Path], dataset_name: str = "held-out text") -> list[EvalResult]:
    """The evaluation results of a results file, for the model card's model-index: lm-evaluation-harness's JSON
    (`diffuapriel eval --output_path`: `results`, task -> "metric,filter" -> value; standard errors left out), or the
    eval_results.json that `diffuapriel train` writes into its output folder (the held-out negative ELBO in bits per
    token and the perplexity bound; `dataset_name` names that held-out text)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data.get("results"), dict):
        return [
            EvalResult(task_type="text-generation", task_name=task, dataset_type=task,
                       dataset_name=str(metrics.get("alias", task)).strip(), metric_type=key.split(",")[0],
                       metric_value=value, source_name="lm-evaluation-harness", source_url=LM_EVAL_URL)
            for task, metrics in data["results"].items() for key, value in metrics.items()
            if _number(value) and "_stderr" not in key
        ]
    results = elbo_evaluation_results(data, dataset_name)
    if not results:
        raise ValueError(
            f"{path} holds neither lm-evaluation-harness results (a 'results' mapping) nor diffuapriel train's "
            f"evaluation ({', '.join(TRAINER_METRICS)}); its keys: {sorted(data)[:8]}"
        )
    return results


def push_folder(folder: Union[str, Path], repo_id: str, commit_message: str = "Upload DiffuApriel model",
                private: Optional[bool] = None, token: Optional[str] = None):
    """Upload every file of `folder` to the Hub model repo `repo_id` (created if it does not exist) in one
    `huggingface_hub` upload; returns its commit info."""
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, token=token)


def save_for_hub(
    model, folder: Union[str, Path], tokenizer=None, repo_id: Optional[str] = None, base_model: Optional[str] = None,
    overwrite: bool = False, overwrite_model_card: bool = False, push: bool = False, private: Optional[bool] = None,
    token: Optional[str] = None, **card_fields,
) -> Path:
    """Write a complete Hub repo for `model` to `folder` and return the folder; with `push`, upload it to `repo_id`
    (`push_folder`: every file of the folder, created as a private repo if `private`).

    A folder that already holds files is refused unless `overwrite`: then the model (weights, configs, tokenizer files,
    remote code) is replaced as a whole and every other file is kept, an existing README.md too unless
    `overwrite_model_card`. The new folder is written beside the old one and put in its place once complete
    (`folders.writing_folder`), so an interrupted save leaves the old folder. The tokenizer is made to pad on the left
    (`pad_on_the_left`), as `generate()` needs, in memory and in the folder. `card_fields` go to `model_card`
    (license, datasets, language, eval_results, training_procedure, limitations, example_prompt)."""
    folder = Path(folder)
    if push and not repo_id:
        raise ValueError("push=True needs repo_id, the Hub repo to upload to (such as 'your-name/diffuapriel-model')")
    entries = folder_entries(folder)
    if entries and not overwrite:
        raise ValueError(
            f"{folder} already holds files ({describe(entries)}): pass overwrite=True (diffuapriel convert: "
            "--overwrite) to replace the model in it, other files kept, or name an empty folder"
        )
    write_card = overwrite_model_card or "README.md" not in entries
    model.config.auto_map = dict(AUTO_MAP)  # transformers adds the saved class to it; we name all three
    with writing_folder(folder) as staging:
        model.save_pretrained(staging)  # safetensors, config.json, generation_config.json, the remote code
        if tokenizer is not None:
            pad_on_the_left(tokenizer)
            tokenizer.save_pretrained(staging)
        if write_card:
            model_card(model, repo_id, base_model, **card_fields).save(staging / "README.md")
    if push:
        push_folder(folder, repo_id, private=private, token=token)
    return folder
