"""DiffuApriel configuration: one config for DiffuApriel (all Mamba), DiffuApriel-H (hybrid) and DiffuTran (all
attention), told apart only by `layer_types`."""

import math

from transformers import PretrainedConfig

MAMBA = "linear_attention"
ATTENTION = "full_attention"
# Older checkpoints (and transformers < 5.2x) spell the layer kinds this way; they are read as the new names.
LEGACY_LAYER_TYPES = {"mamba": MAMBA, "attention": ATTENTION}
BIDIRECTIONAL_STRATEGIES = ("add", "mean")


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
    """

    model_type = "diffuapriel"

    def __init__(
        self,
        vocab_size=50258,
        hidden_size=768,
        num_hidden_layers=12,
        intermediate_size=2048,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        initializer_range=0.02,
        layer_types=None,
        num_attention_heads=12,
        num_key_value_heads=None,
        head_dim=None,
        rope_theta=10000.0,
        attention_bias=False,
        attention_dropout=0.0,
        max_position_embeddings=1024,
        mamba_d_state=128,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_d_head=64,
        mamba_n_groups=1,
        mamba_chunk_size=256,
        mamba_conv_bias=True,
        mamba_proj_bias=False,
        mamba_dt_min=0.001,
        mamba_dt_max=0.1,
        mamba_dt_init_floor=1e-4,
        mamba_dt_limit=(0.0, float("inf")),
        bidirectional=True,
        bidirectional_strategy="add",
        use_mamba_kernels=True,
        mask_token_id=None,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        sampling_eps=1e-3,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        if layer_types is None:
            layer_types = [MAMBA] * num_hidden_layers
        if not isinstance(layer_types, (list, tuple)):
            raise ValueError(f"layer_types must be a list of layer kinds, got {type(layer_types).__name__}")
        self.layer_types = [LEGACY_LAYER_TYPES.get(kind, kind) for kind in layer_types]
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim
        if head_dim is None and num_attention_heads and hidden_size % num_attention_heads == 0:
            self.head_dim = hidden_size // num_attention_heads
        self.rope_theta = rope_theta
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.max_position_embeddings = max_position_embeddings
        self.mamba_d_state = mamba_d_state
        self.mamba_d_conv = mamba_d_conv
        self.mamba_expand = mamba_expand
        self.mamba_d_head = mamba_d_head
        self.mamba_n_groups = mamba_n_groups
        self.mamba_chunk_size = mamba_chunk_size
        self.mamba_conv_bias = mamba_conv_bias
        self.mamba_proj_bias = mamba_proj_bias
        self.mamba_dt_min = mamba_dt_min
        self.mamba_dt_max = mamba_dt_max
        self.mamba_dt_init_floor = mamba_dt_init_floor
        self.mamba_dt_limit = tuple(float(v) for v in mamba_dt_limit)
        self.bidirectional = bidirectional
        self.bidirectional_strategy = bidirectional_strategy
        self.use_mamba_kernels = use_mamba_kernels
        self.mask_token_id = mask_token_id
        self.sampling_eps = sampling_eps
        self.pad_token_id, self.bos_token_id, self.eos_token_id = pad_token_id, bos_token_id, eos_token_id
        # Our own checks first, so that an invalid field gets our message rather than the base class's.
        self.validate()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def mamba_intermediate_size(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def mamba_n_heads(self) -> int:
        return self.mamba_intermediate_size // self.mamba_d_head

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DiffuAprielConfig":
        """A named configuration (see `diffuapriel_hf.modeling.presets.PRESETS`), with fields overridden by keyword."""
        from .presets import preset_config

        return preset_config(name, **overrides)

    def validate(self):
        """Raise a `ValueError` naming the field when the configuration cannot describe a model."""

        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers"):
            positive_int(name)
        if isinstance(self.intermediate_size, bool) or not isinstance(self.intermediate_size, int) or (
            self.intermediate_size < 0
        ):
            raise ValueError(
                f"intermediate_size must be an integer >= 0 (0 removes the MLP), got {self.intermediate_size!r}"
            )
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
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if ATTENTION in self.layer_types:
            positive_int("num_attention_heads")
            positive_int("num_key_value_heads")
            if self.head_dim is None:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                    f"({self.num_attention_heads}), or head_dim must be given"
                )
            positive_int("head_dim")
            if self.head_dim % 2:
                raise ValueError(f"head_dim must be even for the rotary embedding, got {self.head_dim}")
            if self.num_attention_heads % self.num_key_value_heads:
                raise ValueError(
                    f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                    f"({self.num_key_value_heads})"
                )
            if not self.rope_theta > 0:
                raise ValueError(f"rope_theta must be > 0, got {self.rope_theta!r}")
        if MAMBA in self.layer_types:
            for name in ("mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_d_head", "mamba_n_groups",
                         "mamba_chunk_size"):
                positive_int(name)
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
            if not 0 < self.mamba_dt_min <= self.mamba_dt_max:
                raise ValueError(
                    f"need 0 < mamba_dt_min <= mamba_dt_max, got {self.mamba_dt_min!r} and {self.mamba_dt_max!r}"
                )
            low, high = self.mamba_dt_limit if len(self.mamba_dt_limit) == 2 else (None, None)
            if low is None or not 0 <= low < high:
                raise ValueError(
                    f"mamba_dt_limit must be (low, high) with 0 <= low < high, got {self.mamba_dt_limit!r}"
                )
        if self.bidirectional_strategy not in BIDIRECTIONAL_STRATEGIES:
            raise ValueError(
                f"bidirectional_strategy must be one of {BIDIRECTIONAL_STRATEGIES}, got {self.bidirectional_strategy!r}"
            )
        if not isinstance(self.bidirectional, bool):
            raise ValueError(f"bidirectional must be True or False, got {self.bidirectional!r}")
        for name in ("mask_token_id", "pad_token_id", "bos_token_id"):
            value = getattr(self, name, None)
            if value is not None and not (isinstance(value, int) and 0 <= value < self.vocab_size):
                raise ValueError(f"{name} must be a token id in [0, vocab_size={self.vocab_size}), got {value!r}")
        eos = self.eos_token_id if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]
        for value in eos:
            if value is not None and not (isinstance(value, int) and 0 <= value < self.vocab_size):
                raise ValueError(f"eos_token_id must be token ids in [0, vocab_size={self.vocab_size}), got {value!r}")
        if not 0 < self.sampling_eps < 1:
            raise ValueError(f"sampling_eps must be in (0, 1), got {self.sampling_eps!r}")
        if self.max_position_embeddings is not None:
            positive_int("max_position_embeddings")
        if math.isnan(float(self.attention_dropout)) or not 0 <= self.attention_dropout < 1:
            raise ValueError(f"attention_dropout must be in [0, 1), got {self.attention_dropout!r}")
