"""Convert a Mamba-2 language model into DiffuApriel (`diffuapriel convert SOURCE OUTPUT`).

Two source formats are read, from a folder or from a Hub repo id (fetched by `resolve_source` with huggingface_hub):

| format         | folder                                                             | detected by                 |
|----------------|--------------------------------------------------------------------|-----------------------------|
| `transformers` | transformers' `Mamba2ForCausalLM`: config.json, safetensors or bin | `model_type == "mamba2"`    |
| `mamba-ssm`    | mamba-ssm's `MambaLMHeadModel`: config.json, pytorch_model.bin     | `d_model`, `n_layer`, ...   |

Both keep a Mamba-2 mixer's parameters under the same names as ours, so the conversion is a renaming (`KEY_MAPS`)
plus a field mapping of the configuration (`TRANSFORMERS_CONFIG_FIELDS`, `MAMBA_SSM_CONFIG_FIELDS`). Then:

- the mask token is added: a new row of the embedding (and of the head when it is not tied), set to the mean of the
  rows of the real tokens; a source whose embedding is padded past its vocabulary (mamba-ssm pads to a multiple of
  `pad_vocab_size_multiple`) gives the mask token the first padding row instead. A tokenizer, when there is one, gets
  the mask token as a special token with that same id. A tokenizer that already has a mask token among the source's
  real tokens keeps it, and the token keeps its trained rows (`add_mask_token` says so in its result);
- the backward direction (`mixer.right_to_left`) starts as a copy of the forward one, or fresh (`--backward-init`);
- an MLP is added only when asked (`--intermediate-size`), with a zero output projection so that the converted model
  still computes what the source computed.

With `bidirectional=False` and no MLP the converted model reproduces the source's logits on the source vocabulary
(in float32: the sources' `residual_in_fp32`, a float32 residual stream under bf16/fp16, has no counterpart here, so
half-precision logits differ by rounding).
A transformers checkpoint is read by transformers itself (`Mamba2ForCausalLM.from_pretrained`: safetensors or pickles,
sharded or not); a mamba-ssm one with safetensors or `torch.load(weights_only=True)`. Either way a pickle that would
run code is refused.
"""

import argparse
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id
from safetensors.torch import load_file
from transformers import AutoTokenizer, Mamba2Config, Mamba2ForCausalLM

from ..modeling.configuration_diffuapriel import MAMBA, DiffuAprielConfig
from ..modeling.modeling_diffuapriel import DiffuAprielForMaskedLM
from .folders import describe, folder_entries
from .publish import pad_on_the_left, save_for_hub

__all__ = [
    "MAMBA_SSM",
    "TRANSFORMERS",
    "add_arguments",
    "convert",
    "convert_checkpoint",
    "read_state_dict",
    "run",
    "script_main",
]

TRANSFORMERS = "transformers"
MAMBA_SSM = "mamba-ssm"
SOURCE_FORMATS = (TRANSFORMERS, MAMBA_SSM)
BACKWARD_INITS = ("copy", "fresh")
DEFAULT_MASK_TOKEN = "<|mask|>"

# Source key -> our key. `{i}` is a layer index and `{param}` any parameter path below the named module. A tuple of
# target keys splits the source tensor into equal chunks along its first axis, one per target, in order.
KEY_MAPS = {
    TRANSFORMERS: (
        ("backbone.embeddings.weight", "model.embed_tokens.weight"),
        ("backbone.layers.{i}.norm.weight", "model.layers.{i}.input_layernorm.weight"),
        ("backbone.layers.{i}.mixer.{param}", "model.layers.{i}.mixer.left_to_right.{param}"),
        ("backbone.norm_f.weight", "model.norm.weight"),
        ("lm_head.weight", "lm_head.weight"),
    ),
    MAMBA_SSM: (
        ("backbone.embedding.weight", "model.embed_tokens.weight"),
        ("backbone.layers.{i}.norm.weight", "model.layers.{i}.input_layernorm.weight"),
        ("backbone.layers.{i}.mixer.{param}", "model.layers.{i}.mixer.left_to_right.{param}"),
        ("backbone.layers.{i}.norm2.weight", "model.layers.{i}.post_mixer_layernorm.weight"),
        # GatedMLP: fc1 -> [value | gate], out = fc2(value * silu(gate)); ours: down(silu(gate(x)) * up(x)).
        ("backbone.layers.{i}.mlp.fc1.weight", ("model.layers.{i}.mlp.up_proj.weight",
                                                "model.layers.{i}.mlp.gate_proj.weight")),
        ("backbone.layers.{i}.mlp.fc2.weight", "model.layers.{i}.mlp.down_proj.weight"),
        ("backbone.norm_f.weight", "model.norm.weight"),
        ("lm_head.weight", "lm_head.weight"),
    ),
}

# Our config field <- the field of transformers' `Mamba2Config`.
TRANSFORMERS_CONFIG_FIELDS = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_hidden_layers",
    "hidden_act": "hidden_act",
    "rms_norm_eps": "layer_norm_epsilon",  # every RMSNorm of Mamba2, the gated one included
    "tie_word_embeddings": "tie_word_embeddings",
    "initializer_range": "initializer_range",
    "mamba_d_state": "state_size",
    "mamba_d_conv": "conv_kernel",
    "mamba_expand": "expand",
    "mamba_d_head": "head_dim",
    "mamba_n_groups": "n_groups",
    "mamba_chunk_size": "chunk_size",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_proj_bias": "use_bias",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_dt_limit": "time_step_limit",
    "pad_token_id": "pad_token_id",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
}

# mamba-ssm: our field <- (`MambaConfig` field or `ssm_cfg` entry, its default in mamba-ssm). Its norms all use
# eps 1e-5 (the block and final RMSNorms take `norm_epsilon`, which `MambaConfig` does not expose, and `Mamba2`'s gated
# RMSNorm hard-codes it), and the convolution's activation is always silu.
MAMBA_SSM_CONFIG_FIELDS = {
    "hidden_size": ("d_model", None),
    "num_hidden_layers": ("n_layer", None),
    "tie_word_embeddings": ("tie_embeddings", True),
}
MAMBA_SSM_SSM_CFG_FIELDS = {
    "mamba_d_state": ("d_state", 128),
    "mamba_d_conv": ("d_conv", 4),
    "mamba_expand": ("expand", 2),
    "mamba_d_head": ("headdim", 64),
    "mamba_n_groups": ("ngroups", 1),
    "mamba_chunk_size": ("chunk_size", 256),
    "mamba_conv_bias": ("conv_bias", True),
    "mamba_proj_bias": ("bias", False),
    "mamba_dt_min": ("dt_min", 0.001),
    "mamba_dt_max": ("dt_max", 0.1),
    "mamba_dt_init_floor": ("dt_init_floor", 1e-4),
    "mamba_dt_limit": ("dt_limit", (0.0, float("inf"))),
}
MAMBA_SSM_NORM_EPS = 1e-5
# `ssm_cfg` entries that change only initialisation or the kernel path, not what the layer computes.
MAMBA_SSM_SSM_CFG_IGNORED = {"layer", "conv_init", "A_init_range", "use_mem_eff_path", "layer_idx", "sequence_parallel"}
# `ssm_cfg` entries that we can convert only at the value mamba-ssm's Mamba2 uses by default (`d_ssm` may also equal
# the full width expand * d_model, which is what None means).
MAMBA_SSM_SSM_CFG_FIXED = {"d_ssm": None, "D_has_hdim": False, "rmsnorm": True, "norm_before_gate": False}
MAMBA_SSM_GATED_MLP_MULTIPLE = 128  # GatedMLP rounds its hidden width up to a multiple of this


def _compile_pattern(pattern: str) -> "re.Pattern":
    regex = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{param\}", r"(?P<param>[\w.]+)")
    return re.compile(regex + r"\Z")


def rename_state_dict(state_dict: dict, key_map, source_name: str) -> dict:
    """Apply a declarative key map (see `KEY_MAPS`) to a source state dict. Every source key must match a rule."""
    rules = [(_compile_pattern(source), target) for source, target in key_map]
    renamed = {}
    for key, tensor in state_dict.items():
        for regex, target in rules:
            match = regex.match(key)
            if match is None:
                continue
            targets = (target,) if isinstance(target, str) else target
            chunks = (tensor,) if len(targets) == 1 else tensor.chunk(len(targets), dim=0)
            for name, chunk in zip(targets, chunks):
                renamed[name.format(**match.groupdict())] = chunk
            break
        else:
            raise ValueError(
                f"the {source_name} checkpoint holds a tensor {key!r} that no rule of the conversion maps: expected "
                f"keys like {[source for source, _ in key_map]}"
            )
    return renamed


# What a conversion reads from a Hub repo: the configs, the weights in either format, the tokenizer's files.
SOURCE_FILE_PATTERNS = ["*.json", "*.safetensors", "*.bin", "tokenizer*", "*.txt", "*.model"]


def resolve_source(source: Union[str, Path]) -> Path:
    """The folder of `source`: a local folder as it is; anything else is taken as a Hub repo id (`owner/name`) and
    fetched with `huggingface_hub.snapshot_download` (its configs, weights and tokenizer files, into the Hub cache, or
    from it when offline)."""
    if Path(source).is_dir():
        return Path(source)
    try:
        validate_repo_id(str(source))
    except HFValidationError:
        raise FileNotFoundError(f"{source} is neither a folder nor a Hub repo id (owner/name)") from None
    try:
        return Path(snapshot_download(str(source), allow_patterns=SOURCE_FILE_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError) as error:
        raise FileNotFoundError(
            f"{source} is not a folder, and the Hub repo {source} could not be fetched: {str(error).splitlines()[0]}"
        ) from error


def read_config(source: Union[str, Path]) -> dict:
    path = Path(source) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{source} has no config.json: expected a model folder")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def detect_format(config: dict) -> str:
    """`"transformers"` for a `Mamba2ForCausalLM` config, `"mamba-ssm"` for a `MambaLMHeadModel` one with Mamba-2
    layers; a `ValueError` saying what was found otherwise."""
    architectures = config.get("architectures") or []
    if config.get("model_type") == "mamba2" or "Mamba2ForCausalLM" in architectures:
        return TRANSFORMERS
    if all(field in config for field in ("d_model", "n_layer", "vocab_size")):
        layer = (config.get("ssm_cfg") or {}).get("layer", "Mamba1")
        if layer != "Mamba2":
            raise ValueError(
                f"the mamba-ssm model has {layer} layers (ssm_cfg.layer = {layer!r}); only Mamba2 layers convert "
                "(ssm_cfg.layer = 'Mamba2')"
            )
        return MAMBA_SSM
    raise ValueError(
        f"unknown source architecture: found model_type={config.get('model_type')!r}, architectures={architectures}; "
        "expected transformers' Mamba2ForCausalLM (model_type 'mamba2') or a mamba-ssm MambaLMHeadModel config "
        "(d_model, n_layer, vocab_size, ssm_cfg with layer 'Mamba2')"
    )


def _integer_expand(expand, hidden_size, source_field):
    if float(expand) != int(expand):
        raise ValueError(
            f"{source_field} = {expand} is not an integer: DiffuApriel needs an integer expansion factor "
            f"(mamba_expand), the Mamba width being mamba_expand * hidden_size = {expand * hidden_size}"
        )
    return int(expand)


def config_fields_from_transformers(source: dict) -> dict:
    """DiffuApriel config fields of a transformers `Mamba2Config` (as read by `Mamba2Config.from_pretrained`)."""
    fields = {ours: source[theirs] for ours, theirs in TRANSFORMERS_CONFIG_FIELDS.items()}
    fields["mamba_expand"] = _integer_expand(fields["mamba_expand"], fields["hidden_size"], "expand")
    width = fields["mamba_expand"] * fields["hidden_size"]
    if source["num_heads"] * source["head_dim"] != width:
        raise ValueError(
            f"num_heads * head_dim = {source['num_heads'] * source['head_dim']} differs from expand * hidden_size = "
            f"{width}: the checkpoint's Mamba heads do not cover its width"
        )
    fields["vocab_size"] = source["vocab_size"]
    fields["intermediate_size"] = 0
    fields["mamba_dt_limit"] = tuple(float(v) for v in fields["mamba_dt_limit"])
    return fields


def config_fields_from_mamba_ssm(source: dict) -> tuple[dict, int]:
    """DiffuApriel config fields of a mamba-ssm `MambaConfig` dict, and the number of real tokens (its embedding is
    padded past `vocab_size` to a multiple of `pad_vocab_size_multiple`)."""
    if source.get("attn_layer_idx"):
        raise ValueError(
            f"the mamba-ssm model has attention layers (attn_layer_idx = {source['attn_layer_idx']}): only pure "
            "Mamba-2 stacks convert"
        )
    if not source.get("rms_norm", True):
        raise ValueError("the mamba-ssm model uses LayerNorm (rms_norm = false): only RMSNorm models convert")
    ssm_cfg = dict(source.get("ssm_cfg") or {})
    if ssm_cfg.get("d_ssm") == ssm_cfg.get("expand", 2) * source.get("d_model", 0):
        del ssm_cfg["d_ssm"]
    for name, value in MAMBA_SSM_SSM_CFG_FIXED.items():
        if ssm_cfg.get(name, value) != value:
            raise ValueError(f"ssm_cfg.{name} = {ssm_cfg[name]!r} is not supported: only {value!r} converts")
    known = set(MAMBA_SSM_SSM_CFG_IGNORED) | set(MAMBA_SSM_SSM_CFG_FIXED)
    known |= {theirs for theirs, _ in MAMBA_SSM_SSM_CFG_FIELDS.values()}
    unknown = sorted(set(ssm_cfg) - known)
    if unknown:
        raise ValueError(f"ssm_cfg has entries this conversion does not know: {unknown}; known: {sorted(known)}")

    fields = {}
    for ours, (theirs, default) in MAMBA_SSM_CONFIG_FIELDS.items():
        if default is None and theirs not in source:
            raise ValueError(f"the mamba-ssm config.json has no {theirs!r}")
        fields[ours] = source.get(theirs, default)
    for ours, (theirs, default) in MAMBA_SSM_SSM_CFG_FIELDS.items():
        fields[ours] = ssm_cfg.get(theirs, default)
    fields["mamba_expand"] = _integer_expand(fields["mamba_expand"], fields["hidden_size"], "ssm_cfg.expand")
    fields["mamba_dt_limit"] = tuple(float(v) for v in fields["mamba_dt_limit"])
    fields["hidden_act"] = "silu"
    fields["rms_norm_eps"] = MAMBA_SSM_NORM_EPS
    d_intermediate = source.get("d_intermediate", 0)
    multiple = MAMBA_SSM_GATED_MLP_MULTIPLE
    fields["intermediate_size"] = (d_intermediate + multiple - 1) // multiple * multiple if d_intermediate else 0

    real_vocab = source["vocab_size"]
    multiple = source.get("pad_vocab_size_multiple", 8)  # MambaConfig's default
    fields["vocab_size"] = (real_vocab + multiple - 1) // multiple * multiple
    return fields, real_vocab


def _checkpoint_files(source: Path) -> list[Path]:
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (source / single).is_file():
            return [source / single]
        if (source / index).is_file():
            with open(source / index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            return [source / name for name in sorted(set(weight_map.values()))]
    raise FileNotFoundError(
        f"{source} has no weights: expected model.safetensors or pytorch_model.bin (or their sharded index)"
    )


def load_checkpoint_file(path: Union[str, Path]) -> dict:
    """The tensors of one checkpoint file. A pickle (`.bin`) is read with `torch.load(weights_only=True)`, which
    refuses, without running it, anything but tensors and plain containers."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError or RuntimeError depending on the version
        raise ValueError(
            f"{path} is not a plain tensor checkpoint and was not loaded: it was read with "
            f"torch.load(weights_only=True), which refuses pickled code ({str(error).splitlines()[0]})"
        ) from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state_dict


def read_state_dict(source: Union[str, Path]) -> dict:
    state_dict = {}
    for path in _checkpoint_files(Path(source)):
        state_dict.update(load_checkpoint_file(path))
    return state_dict


def check_against_config(state_dict: dict, config: DiffuAprielConfig, source: str):
    """Refuse weights that do not fit the configuration, naming each tensor and both shapes."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in DiffuAprielForMaskedLM(config).state_dict().items()}
    problems = [f"{key} is missing" for key in expected if key not in state_dict]
    problems += [f"{key} is not expected" for key in state_dict if key not in expected]
    problems += [
        f"{key} has shape {tuple(state_dict[key].shape)} but the config implies {shape}"
        for key, shape in expected.items()
        if key in state_dict and tuple(state_dict[key].shape) != shape
    ]
    if problems:
        raise ValueError(
            f"the weights of {source} do not match its config.json (as mapped to ours): " + "; ".join(problems)
        )


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def add_mask_token(num_rows: int, real_vocab: int, tokenizer=None, mask_token: str = DEFAULT_MASK_TOKEN):
    """Choose the mask token's id and give the tokenizer (when there is one) the mask token.

    The id is the tokenizer's mask token when it has one, else the id the tokenizer gives the newly added token, else
    `real_vocab` (the first id past the real tokens). Returns (mask_token_id, number of embedding rows needed, whether
    the mask token is one of the source's real tokens, whose trained rows are then kept)."""
    if tokenizer is None:
        return real_vocab, max(num_rows, real_vocab + 1), False
    had_mask_token = tokenizer.mask_token is not None
    if not had_mask_token:
        tokenizer.add_special_tokens({"mask_token": mask_token})
    mask_token_id = tokenizer.mask_token_id
    needed = max(num_rows, mask_token_id + 1)
    if needed > num_rows + 1 or len(tokenizer) > needed:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens (mask token {tokenizer.mask_token!r} = {mask_token_id}) "
            f"but the model's embedding has {num_rows} rows: the tokenizer does not belong to this model"
        )
    return mask_token_id, needed, had_mask_token and mask_token_id < real_vocab


def with_mask_row(matrix: torch.Tensor, mask_token_id: int, num_rows: int, real_vocab: int,
                  keep_trained_row: bool = False) -> torch.Tensor:
    """(V, D) -> (num_rows, D), the mask token's row set to the mean of the real tokens' rows, or left as the source
    trained it (`keep_trained_row`: the source's tokenizer already had the mask token)."""
    grown = torch.cat([matrix, matrix.new_zeros(num_rows - matrix.shape[0], matrix.shape[1])])  # (num_rows, D)
    if not keep_trained_row:
        real_rows = [i for i in range(min(real_vocab, matrix.shape[0])) if i != mask_token_id]
        grown[mask_token_id] = matrix[real_rows].float().mean(0).to(matrix.dtype)
    return grown


def read_source_config(source: Path, source_format: Optional[str] = None) -> tuple[str, dict, int]:
    """(format, our config fields before the mask token, number of real tokens) of a source folder."""
    raw_config = read_config(source)
    detected = detect_format(raw_config)
    if source_format is not None and detected != source_format:
        raise ValueError(f"{source} is a {detected} checkpoint, but a {source_format} checkpoint was expected")
    if detected == TRANSFORMERS:
        fields = config_fields_from_transformers(Mamba2Config.from_pretrained(source).to_dict())
        real_vocab = fields["vocab_size"]
    else:
        fields, real_vocab = config_fields_from_mamba_ssm(raw_config)
    fields.update(layer_types=[MAMBA] * fields["num_hidden_layers"], max_position_embeddings=None)
    return detected, fields, real_vocab


def read_transformers_weights(source: Path) -> dict:
    """The weights of a transformers `Mamba2ForCausalLM` folder as transformers loads them (in the checkpoint's dtype,
    pickles with weights_only=True); a checkpoint that lacks a weight, holds one the model does not have or one of
    another shape is refused, naming them, rather than completed with fresh weights."""
    model, loading = Mamba2ForCausalLM.from_pretrained(source, dtype="auto", output_loading_info=True)
    problems = {kind: found for kind, found in loading.items() if found}
    if problems:
        raise ValueError(f"the weights of {source} do not match its config.json: {problems}")
    return model.state_dict()


def read_source_weights(source: Path, source_format: str, fields: dict) -> dict:
    """The source's weights under our names (the head included when tied), checked against its config."""
    weights = read_transformers_weights(source) if source_format == TRANSFORMERS else read_state_dict(source)
    state_dict = rename_state_dict(weights, KEY_MAPS[source_format], source_format)
    if fields["tie_word_embeddings"]:
        head = state_dict.get("lm_head.weight")
        if head is not None and not torch.equal(head, state_dict["model.embed_tokens.weight"]):
            raise ValueError(f"{source}: the embeddings are tied in config.json but lm_head.weight differs from them")
        state_dict["lm_head.weight"] = state_dict["model.embed_tokens.weight"]
    check_against_config(state_dict, DiffuAprielConfig(**fields, bidirectional=False), str(source))
    return state_dict


def convert_checkpoint(
    source: Union[str, Path],
    bidirectional: bool = True,
    backward_init: str = "copy",
    intermediate_size: Optional[int] = None,
    tokenizer=None,
    mask_token: str = DEFAULT_MASK_TOKEN,
    dtype: Optional[torch.dtype] = None,
    source_format: Optional[str] = None,
):
    """Convert a Mamba-2 language model folder into a `DiffuAprielForMaskedLM`.

    Args:
        source: a transformers `Mamba2ForCausalLM` or mamba-ssm `MambaLMHeadModel` folder, or the Hub id of one
            (`resolve_source`).
        bidirectional: add the right-to-left direction (False keeps a causal Mamba-2 LM, for checking parity).
        backward_init: `"copy"` starts the right-to-left direction as the left-to-right one, `"fresh"` initialises it
            anew.
        intermediate_size: width of an MLP to add to every block (its output projection starts at zero); None keeps
            the source's (none for transformers' Mamba2, `d_intermediate` for mamba-ssm).
        tokenizer: a tokenizer to give the mask token, a path to load one from, or None for the source folder's own
            tokenizer when it has one.
        mask_token: the mask token's text, when the tokenizer has none.
        dtype: the dtype of the converted weights (default: the source's).
        source_format: `"transformers"` or `"mamba-ssm"` to refuse any other format; None detects it.

    Returns (model, tokenizer or None); the tokenizer pads on the left, as `generate()` needs.
    """
    if backward_init not in BACKWARD_INITS:
        raise ValueError(f"backward_init must be one of {BACKWARD_INITS}, got {backward_init!r}")
    source = resolve_source(source)
    source_format, fields, real_vocab = read_source_config(source, source_format)
    state_dict = read_source_weights(source, source_format, fields)
    new_mlp = add_mlp_width(fields, intermediate_size)
    if isinstance(tokenizer, (str, Path)) or (tokenizer is None and _has_tokenizer(source)):
        tokenizer = AutoTokenizer.from_pretrained(source if tokenizer is None else tokenizer)
    mask_token_id, num_rows = give_mask_token(state_dict, fields, real_vocab, tokenizer, mask_token)
    if tokenizer is not None:
        pad_on_the_left(tokenizer)  # a causal LM's tokenizer often pads on the right; generate() needs the left
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(tokenizer, name, None) is not None:
                fields[name] = getattr(tokenizer, name)
    config = DiffuAprielConfig(
        **{**fields, "vocab_size": num_rows}, mask_token_id=mask_token_id, bidirectional=bidirectional
    )
    if bidirectional and backward_init == "copy":
        for key in [k for k in state_dict if ".mixer.left_to_right." in k]:
            state_dict[key.replace(".mixer.left_to_right.", ".mixer.right_to_left.")] = state_dict[key].clone()
    model = load_converted(config, state_dict, new_mlp)
    model.to(dtype or state_dict["model.embed_tokens.weight"].dtype)
    return model.eval(), tokenizer


def add_mlp_width(fields: dict, intermediate_size: Optional[int]) -> bool:
    """Sets the MLP width of a source without one to `intermediate_size`; returns whether an MLP is added. A width
    that differs from the source's own MLP is refused: that MLP is converted as it is."""
    source_mlp = fields["intermediate_size"]
    if intermediate_size is not None and source_mlp and intermediate_size != source_mlp:
        raise ValueError(
            f"intermediate_size={intermediate_size} differs from the source's MLP width {source_mlp}: the source's "
            "MLP is converted as it is"
        )
    new_mlp = not source_mlp and bool(intermediate_size)
    if new_mlp:
        fields["intermediate_size"] = intermediate_size
    return new_mlp


def give_mask_token(state_dict: dict, fields: dict, real_vocab: int, tokenizer, mask_token: str) -> tuple[int, int]:
    """The mask token's id and the converted vocabulary's rows; the embedding and (untied) head in `state_dict` get
    the mask token's row, or keep it where the source had already trained that token (with a warning)."""
    embedding = state_dict["model.embed_tokens.weight"]
    mask_token_id, num_rows, trained = add_mask_token(embedding.shape[0], real_vocab, tokenizer, mask_token)
    if trained:
        warnings.warn(f"the tokenizer's mask token {tokenizer.mask_token!r} (id {mask_token_id}) is one of the "
                      "source's tokens: its trained embedding and head rows are kept", stacklevel=3)
    state_dict["model.embed_tokens.weight"] = with_mask_row(embedding, mask_token_id, num_rows, real_vocab, trained)
    tied = fields["tie_word_embeddings"]
    state_dict["lm_head.weight"] = state_dict["model.embed_tokens.weight"] if tied else with_mask_row(
        state_dict["lm_head.weight"], mask_token_id, num_rows, real_vocab, trained)
    return mask_token_id, num_rows


def load_converted(config: DiffuAprielConfig, state_dict: dict, new_mlp: bool) -> "DiffuAprielForMaskedLM":
    """A model of `config` holding the converted weights; fresh weights only where the source has none (a fresh
    right-to-left direction, an added MLP, whose output projection starts at zero so that it adds nothing)."""
    model = DiffuAprielForMaskedLM(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    left_fresh = lambda key: (config.bidirectional and ".mixer.right_to_left." in key) or (  # noqa: E731
        new_mlp and (".mlp." in key or ".post_mixer_layernorm." in key))
    if unexpected or not all(left_fresh(key) for key in missing):
        raise RuntimeError(f"conversion bug: keys not loaded {unexpected}, keys left fresh {missing}")
    if new_mlp:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.down_proj.weight.zero_()  # the new MLP adds nothing until it is trained
    return model


def convert(
    source, output, repo_id: Optional[str] = None, base_model: Optional[str] = None, overwrite: bool = False, **kwargs
) -> Path:
    """Convert `source` (a folder or a Hub id, see `convert_checkpoint`) and write a complete Hub folder to `output`;
    `repo_id` (where it will be published) and `base_model` (the source's Hub id; by default `source` when it is not a
    folder) go into the model card. An `output` that holds files is refused before anything is read unless
    `overwrite` (see `save_for_hub`); one that is the source always is."""
    if Path(source).resolve() == Path(output).resolve():
        raise ValueError(f"the output folder {output} is the source folder: name another folder to write to")
    entries = folder_entries(output)
    if entries and not overwrite:
        raise ValueError(
            f"the output folder {output} already holds files ({describe(entries)}): pass --overwrite "
            "(overwrite=True) to replace the model in it, other files kept, or name an empty folder"
        )
    if base_model is None and not Path(source).is_dir():
        base_model = str(source)
    model, tokenizer = convert_checkpoint(source, **kwargs)
    return save_for_hub(
        model, output, tokenizer=tokenizer, repo_id=repo_id, base_model=base_model, overwrite=overwrite
    )


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser):
    parser.add_argument("source", help="a transformers Mamba2ForCausalLM or mamba-ssm MambaLMHeadModel folder, or its "
                                       "Hub id (owner/name, fetched with huggingface_hub)")
    parser.add_argument("output", help="the folder to write the DiffuApriel model to")
    parser.add_argument("--no-bidirectional", dest="bidirectional", action="store_false",
                        help="keep a causal (left-to-right only) model: reproduces the source's logits")
    parser.add_argument("--backward-init", choices=BACKWARD_INITS, default="copy",
                        help="start the right-to-left direction as a copy of the left-to-right one, or fresh")
    parser.add_argument("--intermediate-size", type=int, default=None,
                        help="add a SwiGLU MLP of this width to every block (zero output projection at first)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer (folder or Hub id) to add the mask token to (default: the source's, if any)")
    parser.add_argument("--mask-token", default=DEFAULT_MASK_TOKEN, help="text of the mask token when it is added")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the weights (default: the source's)")
    parser.add_argument("--source-format", choices=SOURCE_FORMATS, default=None,
                        help="refuse a source of any other format (default: detect it)")
    parser.add_argument("--repo-id", default=None, help="Hub repo the output will be published to (for the model card)")
    parser.add_argument("--base-model", default=None,
                        help="Hub id of the source model (for the model card; default: SOURCE when it is a Hub id)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the model in an output folder that holds one (its other files are kept)")


def run(args, prog: str = "diffuapriel convert"):
    try:
        output = convert(
            args.source, args.output, bidirectional=args.bidirectional, backward_init=args.backward_init,
            intermediate_size=args.intermediate_size, tokenizer=args.tokenizer, mask_token=args.mask_token,
            dtype=DTYPES[args.dtype] if args.dtype else None, source_format=args.source_format,
            repo_id=args.repo_id, base_model=args.base_model, overwrite=args.overwrite,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {output}")
    return 0


def script_main(source_format: str, description: str, argv=None) -> int:
    """The command of a conversion script under `conversion/`: `diffuapriel convert` pinned to one source format."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(source_format=source_format)
    return run(parser.parse_args(argv), prog=parser.prog)
