"""DiffuApriel configuration: one config for DiffuApriel (all Mamba), DiffuApriel-H (hybrid) and DiffuTran (all
attention), told apart only by `layer_types`.

The checks are transformers v5's strict-dataclass validators (huggingface_hub's `@strict`): a check of one field
alone is a validated field, run whenever the field is set; a check across fields is a `validate_*` method, run after
construction, by `validate()` and before `save_pretrained`."""

from functools import wraps
from typing import Literal

from huggingface_hub.dataclasses import as_validated_field, strict
from huggingface_hub.errors import StrictDataclassError
from transformers import PretrainedConfig

from .presets import ATTENTION, MAMBA, PRESETS

# Older checkpoints (and transformers < 5.2x) spell the layer kinds this way; they are read as the new names.
LEGACY_LAYER_TYPES = {"mamba": MAMBA, "attention": ATTENTION}
BidirectionalStrategy = Literal["add", "mean"]


@as_validated_field
def positive_int(value):
    if value < 1:
        raise ValueError(f"must be a positive integer, got {value!r}")


@as_validated_field
def non_negative_int(value):
    if value < 0:
        raise ValueError(f"must be an integer >= 0 (0 removes the MLP), got {value!r}")


@as_validated_field
def positive_int_or_none(value):
    if value is not None and value < 1:
        raise ValueError(f"must be a positive integer or None, got {value!r}")


@as_validated_field
def positive_number(value):
    if not value > 0:
        raise ValueError(f"must be > 0, got {value!r}")


@as_validated_field
def dropout_probability(value):
    if not 0 <= value < 1:
        raise ValueError(f"must be in [0, 1), got {value!r}")


@as_validated_field
def open_unit_interval(value):
    if not 0 < value < 1:
        raise ValueError(f"must be in (0, 1), got {value!r}")


@as_validated_field
def increasing_range(value):
    if len(value) != 2 or not 0 <= value[0] < value[1]:
        raise ValueError(f"must be (low, high) with 0 <= low < high, got {value!r}")


def raise_value_errors(cls):
    """`@strict` reports a failed check as a `StrictDataclassError`, which is not a `ValueError`. A config that
    cannot describe a model raises `ValueError` naming the field (the contract every caller of this package
    catches), so the class re-raises its checks' errors as that, chained to the strict error."""
    strict_setattr, strict_validate = cls.__setattr__, cls.validate

    def __setattr__(self, name, value):
        try:
            strict_setattr(self, name, value)
        except StrictDataclassError as error:
            message = str(error.__cause__)  # a type check names the field, a value check says what is wrong
            raise ValueError(message if repr(name) in message else f"{name} {message}") from error

    @wraps(strict_validate)
    def validate(self):
        try:
            strict_validate(self)
        except StrictDataclassError as error:
            raise ValueError(str(error.__cause__)) from error

    cls.__setattr__, cls.validate = __setattr__, validate
    return cls


@raise_value_errors
@strict
class DiffuAprielConfig(PretrainedConfig):
    r"""
    Configuration of a DiffuApriel masked diffusion language model.

    Args:
        vocab_size: number of tokens, the mask token included.
        hidden_size: width of the residual stream.
        num_hidden_layers: number of blocks.
        intermediate_size: width of the SwiGLU MLP of each block; 0 removes the MLP.
        hidden_act: activation of the MLP gate and of the Mamba convolution.
        rms_norm_eps: epsilon of every RMSNorm.
        tie_word_embeddings: share the input embedding and the LM head.
        initializer_range: standard deviation of the normal initialisation of linear and embedding weights.
        layer_types: one entry per layer, `"linear_attention"` (bidirectional Mamba-2) or `"full_attention"`
            (bidirectional attention); `"mamba"` / `"attention"` are read as these. Default: all Mamba.
        num_attention_heads, num_key_value_heads, head_dim: attention heads (grouped-query when fewer key/value
            heads); `head_dim` defaults to `hidden_size // num_attention_heads`.
        rope_theta: base of the rotary position embedding of the attention layers.
        attention_bias, attention_dropout: bias of the q/k/v/o projections, dropout on attention probabilities.
        max_position_embeddings: advisory context length (training and `generate()` check against it; the model
            itself accepts any length).
        mamba_d_state, mamba_d_conv, mamba_expand, mamba_d_head, mamba_n_groups, mamba_chunk_size: Mamba-2 state
            size, convolution width, expansion factor, head dimension, number of B/C groups and SSD chunk length.
        mamba_conv_bias, mamba_proj_bias: biases of the convolution and of the in/out projections.
        mamba_dt_min, mamba_dt_max, mamba_dt_init_floor: range of the initial time steps.
        mamba_dt_limit: the time step is clamped to this range after the softplus.
        bidirectional: two Mamba-2 mixers per block, one reading each way (False: a causal Mamba-2 stack).
        bidirectional_strategy: how the two directions are combined: `"add"` (sum) or `"mean"`.
        use_mamba_kernels: use mamba-ssm's Triton kernels (and causal-conv1d's) on CUDA tensors when installed.
        mask_token_id, pad_token_id, bos_token_id, eos_token_id: special token ids.
        sampling_eps: lower bound of the diffusion time `t` in training.
        block_size: None for a full-sequence model (every position reads the whole sequence). An integer makes a
            block diffusion model: the sequence is cut into blocks of this many tokens from its start; the
            left-to-right Mamba scan runs over the whole sequence, the right-to-left scan and attention stop at the
            end of each block, so a block's logits depend on it and the blocks before it only. Training then uses
            BD3-LM's objective (`block_diffusion.py`).
    """

    model_type = "diffuapriel"

    vocab_size: int = positive_int(default=50258)
    hidden_size: int = positive_int(default=768)
    num_hidden_layers: int = positive_int(default=12)
    intermediate_size: int = non_negative_int(default=2048)
    hidden_act: str = "silu"
    rms_norm_eps: float = positive_number(default=1e-5)
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    layer_types: list[str] | tuple[str, ...] | None = None
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rope_theta: float | int = positive_number(default=10000.0)
    attention_bias: bool = False
    attention_dropout: float | int = dropout_probability(default=0.0)
    max_position_embeddings: int | None = positive_int_or_none(default=1024)
    mamba_d_state: int = positive_int(default=128)
    mamba_d_conv: int = positive_int(default=4)
    mamba_expand: int = positive_int(default=2)
    mamba_d_head: int = positive_int(default=64)
    mamba_n_groups: int = positive_int(default=1)
    mamba_chunk_size: int = positive_int(default=256)
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_dt_min: float = positive_number(default=0.001)
    mamba_dt_max: float = positive_number(default=0.1)
    mamba_dt_init_floor: float = positive_number(default=1e-4)
    mamba_dt_limit: list[float | int] | tuple[float | int, ...] = increasing_range(default=(0.0, float("inf")))
    bidirectional: bool = True
    bidirectional_strategy: BidirectionalStrategy = "add"
    use_mamba_kernels: bool = True
    mask_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    sampling_eps: float = open_unit_interval(default=1e-3)
    block_size: int | None = positive_int_or_none(default=None)

    def __post_init__(self, **kwargs):
        if self.layer_types is None:
            self.layer_types = [MAMBA] * self.num_hidden_layers
        self.layer_types = [LEGACY_LAYER_TYPES.get(kind, kind) for kind in self.layer_types]
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.mamba_dt_limit = tuple(float(v) for v in self.mamba_dt_limit)  # JSON gives a list
        super().__post_init__(**kwargs)

    @property
    def mamba_intermediate_size(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def mamba_n_heads(self) -> int:
        return self.mamba_intermediate_size // self.mamba_d_head

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DiffuAprielConfig":
        """The configuration of preset `name` (see `presets.PRESETS`), with any field overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
        fields = dict(PRESETS[name])
        if "num_hidden_layers" in overrides and "layer_types" not in overrides and "layer_types" in fields:
            raise ValueError(f"preset {name!r} fixes layer_types: give layer_types together with num_hidden_layers")
        return cls(**{**fields, **overrides})

    # The `validate_*` methods below check fields against each other; `@strict` runs them in name order, after the
    # checks of single fields, so a bad size is named before anything computed from it.

    def validate_attention_heads(self):
        if ATTENTION not in self.layer_types:
            return
        for name in ("num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}), or head_dim must be given"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for the rotary embedding, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads})"
            )

    def validate_layer_type(self):
        """Replaces transformers' check, which accepts every layer kind of every model."""
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        unknown = sorted({str(kind) for kind in self.layer_types} - {MAMBA, ATTENTION})
        if unknown:
            raise ValueError(
                f"layer_types has unknown entries {unknown}: expected {MAMBA!r} (or 'mamba') and {ATTENTION!r} "
                "(or 'attention')"
            )

    def validate_mamba_heads(self):
        if MAMBA not in self.layer_types:
            return
        if self.mamba_intermediate_size % self.mamba_d_head:
            raise ValueError(
                f"mamba_expand * hidden_size ({self.mamba_intermediate_size}) must be divisible by mamba_d_head "
                f"({self.mamba_d_head})"
            )
        if self.mamba_n_heads % self.mamba_n_groups:
            raise ValueError(
                f"the number of Mamba heads ({self.mamba_n_heads} = mamba_expand * hidden_size / mamba_d_head) "
                f"must be divisible by mamba_n_groups ({self.mamba_n_groups})"
            )
        if self.mamba_dt_min > self.mamba_dt_max:
            raise ValueError(
                f"need mamba_dt_min <= mamba_dt_max, got {self.mamba_dt_min!r} and {self.mamba_dt_max!r}"
            )

    def validate_token_ids(self):
        """Replaces transformers' check, which only warns: a token id outside the vocabulary is an error here."""
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        named_ids = [("mask_token_id", self.mask_token_id), ("pad_token_id", self.pad_token_id),
                     ("bos_token_id", self.bos_token_id)] + [("eos_token_id", value) for value in eos]
        for name, value in named_ids:
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} must be a token id in [0, vocab_size={self.vocab_size}), got {value!r}")


preset_config = DiffuAprielConfig.from_preset

__all__ = ["ATTENTION", "MAMBA", "DiffuAprielConfig", "preset_config"]
