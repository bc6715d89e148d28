"""Which implementation each operation of a forward pass takes, decided in one place.

Every operation the model fuses has a PyTorch reference (runs everywhere, carries gradients) and one or more kernels:

| operation                                  | reference                          | kernel (CUDA)                            |
|--------------------------------------------|------------------------------------|------------------------------------------|
| SSD scan, causal conv1d, gated norm        | `mamba_ops.*_reference`            | mamba-ssm / causal-conv1d, our           |
|                                            |                                    | `ssd_triton.ssd_forward` (inference)     |
| the mixer from in_proj's output to         | those steps one after another      | training: `training_mixer` (our SSD      |
| out_proj's (training)                      | (`mamba_split_conv1d_scan_         | forward, states' gradient walk, dx and   |
|                                            | reference`)                        | gated-norm backward; mamba-ssm's other   |
|                                            |                                    | backward kernels) or mamba-ssm's fused   |
|                                            |                                    | mixer function                           |
| direction sum; residual add + next norm    | `fused_ops.*_reference`            | `fused_ops` Triton kernels (the add +    |
|                                            |                                    | norm also in training)                   |
| the mixer's two reading orders (training)  | `reverse_time`, autograd's sum of  | `fused_ops.BothReadingOrders`: the       |
|                                            | the two gradients                  | direction sum's kernel as its backward   |
| SwiGLU activation                          | `fused_ops.swiglu_reference`       | `fused_ops` Triton kernel (training: of  |
|                                            |                                    | one product, with a backward kernel)     |
| rotary embedding of queries and keys       | `fused_ops.rotary_reference`       | `fused_ops` Triton kernel (its backward  |
|                                            |                                    | the same kernel, turning the other way)  |
| block RMSNorm                              | float32 statistics, six passes     | `F.rms_norm`, one kernel                 |
| MLP gate and up projections                | two products                       | one product of the stacked weights       |
|                                            |                                    | (inference: long inputs; training: all)  |
| LM head                                    | the vocabulary as it is            | the vocabulary padded to a multiple of 8 |
| attention against a `BlockDiffusionCache`  | the attention implementation under | `cache_attention` Triton kernel          |
|                                            | the cache's mask                   | (inference, not `eager`)                 |
| the loss's -log p(label)                   | `diffusion.token_nll` (a float32   | `loss_triton` Triton kernels (no float32 |
|                                            | copy, then cross-entropy)          | copy of the logits)                      |

`resolve_kernel_policy(config, device)` makes every choice once per forward, from the config (`use_mamba_kernels`),
the device, grad mode and what is installed, into a `KernelPolicy` that the model passes to its layers; the layers
hold no device branches. `override_kernel_policy(**fields)` replaces fields of the resolved policy for the code it
wraps: tests and benchmarks switch paths with it instead of patching module attributes. Kernels without a backward
also refuse, call by call, any tensor that needs a gradient (`mamba_ops.needs_gradient`), whatever the policy says.

Every tuned dispatch threshold is in `DISPATCH_THRESHOLDS`, with the result file of the benchmark that set it (the
modules that apply one read it from here). What a kernel can take is no tuned choice and stays with the kernel:
`fused_ops.MAX_NORM_WIDTH` (the norm kernel holds a row in registers), causal-conv1d's widths 2 to 4.
"""

import contextlib
import dataclasses
import functools
import warnings
from contextvars import ContextVar
from typing import Callable, Optional

import torch

from .diffusion import token_nll
from .fused_ops import TRITON_INSTALLED
from .loss_triton import token_nll as token_nll_by_kernels
from .mamba_ops import TORCH_OPS, MambaOps, kernel_ops


@dataclasses.dataclass(frozen=True)
class Threshold:
    value: int
    meaning: str
    source: str  # the benchmark result that set it


DISPATCH_THRESHOLDS = {
    "mlp_one_product_min_tokens": Threshold(
        32768,
        "from this many tokens a call, the MLP computes gate and up as one product: at 64K tokens of the 1.3B presets "
        "on an H200 1.63 ms against 2 x 0.94 ms for two, a whole graphed step 399-401 against 403.5-406 ms (32K: "
        "198.3-199.6 against 199.1-200.4 ms); at 4K to 16K tokens whole steps were no faster, within 0.6 ms",
        "benchmarks/results/gemm_shapes.json, benchmarks/results/fusion_ab.json",
    ),
    "lm_head_vocab_multiple": Threshold(
        8,
        "the LM head's rows padded to a multiple of this for the product: rows of an odd width such as GPT-2's 50,258 "
        "are not 16-byte aligned and send cuBLAS to a kernel 2.4x slower (53 vs 23 ms at 64K tokens on an H200); a "
        "multiple of 128 was no faster",
        "benchmarks/results/throughput_analysis.md",
    ),
    "lm_head_padding_min_tokens": Threshold(
        512,
        "the LM head pads its vocabulary (lm_head_vocab_multiple) only for products of at least this many tokens: the "
        "padding copies the whole head's weight (206 MB for the 1.3B presets, 0.14 ms on an H100), which a block "
        "model's 32-token step does not earn back (graphed steps after 8K tokens, unpadded against padded: 3.76 vs "
        "3.90 ms for diffuapriel-1.3b-block, 5.11 vs 5.20 for diffutran-1.3b-block; at 16 x 32 tokens equal within "
        "0.5%)",
        "benchmarks/results/block_step.json",
    ),
    "ssd_segment_walks_per_multiprocessor": Threshold(
        6,
        "single-pass SSD with fewer (sequence, head) walks than multiprocessors: each sequence cut into enough "
        "segments for this many walks per multiprocessor",
        "benchmarks/results/ssd_kernel.json",
    ),
    "ssd_min_segment_length": Threshold(
        1024, "single-pass SSD: no segment shorter than this many tokens", "benchmarks/results/ssd_kernel.json"
    ),
    "ssd_single_pass_short_sequence": Threshold(
        512,
        "single-pass SSD for every sequence of at most this many tokens, however few its walks: a block model's "
        "generation steps and committed blocks (32 tokens in the presets). On an H100 at the 1.3B presets' heads, one "
        "call from a state: 7.8 vs 18.7 us at 1 x 32 tokens, 16.1 vs 26.7 at 1 x 128, 48.9 vs 87.3 at 1 x 512 (ours "
        "vs mamba-ssm's, from CUDA graphs); whole graphed steps of diffuapriel-1.3b-block after 8K tokens: 3.90 vs "
        "4.33 ms at batch 1, 6.29 vs 10.53 at batch 16. (At 1 x 1K tokens mamba-ssm's kernels won whole steps: "
        "ssd_min_segments.)",
        "benchmarks/results/ssd_dispatch_short.json, benchmarks/results/block_step.json",
    ),
    "graph_max_tokens": Threshold(
        16384,
        "generate() replays denoising steps of at most this many tokens (batch x length) from a CUDA graph, and runs "
        "longer ones eagerly, where launches no longer matter and a capture would only cost time and a second copy of "
        "the logits: diffuapriel-1.3b on an H200 took 67.6 ms eagerly and 52.3 ms graphed at 1 x 8K tokens, 98.1 and "
        "100.5 ms at 1 x 16K, 92.9 and 96.7 ms at 16 x 1K, 187.2 and 189.4 ms at 1 x 32K (the boundary lies between "
        "8K and 16K tokens; 16K was kept)",
        "benchmarks/results/throughput.json",
    ),
    "ssd_min_segments": Threshold(
        4,
        "single-pass SSD: with fewer segments than this (and fewer walks than multiprocessors) mamba-ssm's kernels "
        "keep the call (at 1 x 2K tokens of the 1.3B presets, 19.3 vs 14.5 ms a step; 1 x 4K: 27.0 vs 27.9 ms)",
        "benchmarks/results/ssd_dispatch.json",
    ),
}


@dataclasses.dataclass(frozen=True)
class KernelPolicy:
    """One forward pass's choice of implementations (see the module's table).

    mamba: the Mamba mixer's SSD scan, convolution and gated norm (`mamba_ops.TORCH_OPS` or `mamba_ops.kernel_ops()`).
    fused_elementwise: the Triton kernels of the direction sum and the residual add + norm (which has a backward).
    fused_swiglu: the Triton kernel of the SwiGLU activation.
    fused_rotary: the Triton kernel of the attention layers' rotary embedding (which has a backward).
    fused_reading_orders: in training, the bidirectional mixer's two reading orders as `fused_ops.BothReadingOrders`,
        whose backward sums the directions' gradients in one kernel.
    fused_rms_norm: `F.rms_norm` for the block norms (where input and weight share a dtype).
    mlp_one_product_min_tokens: from how many tokens the MLP computes gate and up as one product (None: never).
    vocab_multiple: the LM head's vocabulary padded to a multiple of this for its product (1: not padded)...
    vocab_padding_min_tokens: ...in products of at least this many tokens.
    cache_attention: attention layers of passes against a block model's exact cache run `cache_attention.py`'s
        kernel instead of the attention implementation (which `eager` keeps, for its attention maps).
    block_documents: a block model's right-to-left direction reads each block as a document of the whole row
        (`BidirectionalMamba2Mixer.right_to_left_in_documents`) instead of as a row of its own.
    token_nll: the loss's -log p(label) from the logits: `diffusion.token_nll`, or `loss_triton.token_nll` (two Triton
        kernels, no float32 copy of the logits).
    """

    mamba: MambaOps = TORCH_OPS
    fused_elementwise: bool = False
    fused_swiglu: bool = False
    fused_rotary: bool = False
    fused_reading_orders: bool = False
    fused_rms_norm: bool = False
    mlp_one_product_min_tokens: Optional[int] = None
    vocab_multiple: int = 1
    vocab_padding_min_tokens: int = 0
    cache_attention: bool = False
    block_documents: bool = False
    token_nll: Callable = token_nll


REFERENCE_POLICY = KernelPolicy()  # PyTorch everywhere: CPU, MPS, and whatever lacks a kernel
_overrides: ContextVar[dict] = ContextVar("diffuapriel_kernel_policy_overrides", default={})


def resolve_kernel_policy(config, device: torch.device) -> KernelPolicy:
    """The policy for a forward pass of a model with this config on this device, in the current grad mode, with the
    fields `override_kernel_policy` sets (outside `torch.compile`, which cannot read them)."""
    device = torch.device(device)
    policy = _default_policy(device.type, bool(config.use_mamba_kernels), torch.is_grad_enabled(),
                             config._attn_implementation == "eager")
    overrides = {} if torch.compiler.is_compiling() else _overrides.get()
    return dataclasses.replace(policy, **overrides) if overrides else policy


@contextlib.contextmanager
def override_kernel_policy(**fields):
    """Within the block, every resolved `KernelPolicy` has these fields replaced, e.g.
    `with override_kernel_policy(mamba=TORCH_OPS, fused_elementwise=False): model(ids)` runs the references."""
    unknown = set(fields) - {field.name for field in dataclasses.fields(KernelPolicy)}
    if unknown:
        raise TypeError(f"override_kernel_policy got unknown KernelPolicy fields: {sorted(unknown)}")
    token = _overrides.set({**_overrides.get(), **fields})
    try:
        yield
    finally:
        _overrides.reset(token)


@functools.lru_cache
def _default_policy(device_type: str, use_mamba_kernels: bool, grad_enabled: bool,
                    eager_attention: bool) -> KernelPolicy:
    if device_type != "cuda":
        return REFERENCE_POLICY
    # Of fused_ops' Triton kernels, the residual add + norm (`AddRMSNorm`) and the SwiGLU of one product
    # (`SwiGLUOfProduct`) have a backward; the others refuse, call by call, tensors that need a gradient. AddRMSNorm
    # in training: a 1.3B step's forward and backward 369 vs 378 ms at 4 x 4K, block 540 vs 549 ms at 2 x 4K (H100,
    # results/training_fusions.json). In training the MLP always takes gate and up as one product, whose SwiGLU
    # backward writes its gradient in one buffer, so that the input's gradient is one product, with no addition:
    # 345 vs 349 ms (diffuapriel-1.3b) and 347 vs 355 ms (diffutran-1.3b) at 4 x 4K, peak 33.3 vs 34.2 GiB and
    # 32.9 vs 36.0 GiB (H200, results/training_fusions_swiglu.json).
    forward_only = TRITON_INSTALLED and not grad_enabled
    return KernelPolicy(
        mamba=_mamba_ops(use_mamba_kernels, grad_enabled),
        fused_elementwise=TRITON_INSTALLED,
        fused_swiglu=TRITON_INSTALLED,
        # The rotary embedding in one kernel each way instead of transformers' form (several kernels and copies):
        # diffutran-1.3b's forward and backward at 4 x 4K 313.8 vs 357.9 ms, diffuapriel-h-1.3b's 370.5 vs 377.6 ms
        # (H100, results/training_fusions_rotary.json).
        fused_rotary=TRITON_INSTALLED,
        # The directions' input gradients summed in one kernel: diffuapriel-1.3b's forward and backward at 4 x 4K
        # 367.3 vs 369.6 ms, the same memory and loss (H100, results/training_fusions_training_pass.json).
        fused_reading_orders=TRITON_INSTALLED,
        # One fused kernel (float32 statistics, one rounding at the end) instead of six passes over a float32 copy:
        # 0.09 vs 0.88 ms for 32K tokens of width 2048 on an H200, 12% of a 1.3B Mamba step.
        fused_rms_norm=True,
        mlp_one_product_min_tokens=0 if grad_enabled else DISPATCH_THRESHOLDS["mlp_one_product_min_tokens"].value,
        vocab_multiple=DISPATCH_THRESHOLDS["lm_head_vocab_multiple"].value,
        vocab_padding_min_tokens=DISPATCH_THRESHOLDS["lm_head_padding_min_tokens"].value,
        # No mask built, and a step's key range split over programs: a step after 64K kept keys took 0.23 ms a layer
        # against 1.48 through SDPA under the cache's mask (H100, from CUDA graphs: results/cache_attention.json).
        cache_attention=forward_only and not eager_attention,
        # In training, rows of one block run mamba-ssm's kernels in chunks of 32 tokens; whole rows restarting at each
        # block run them in chunks of mamba_chunk_size: a 1.3B block model's forward and backward on 2 x 4K tokens took
        # 798 vs 976 ms (H100, results/block_step_training.json). Inference keeps rows of one block: our single-pass
        # SSD takes them (it has no documents).
        block_documents=grad_enabled,
        # With training_mixer's dx and gated-norm backward kernels, a 1.3B forward and backward took 321.8 vs 328.9 ms
        # at 4 x 4K and 326.7 vs 337.4 ms at 1 x 16K, the same loss to 7 digits (H200, the three changes in one:
        # results/compare_training_kernels_4k.json, _16k.json).
        token_nll=token_nll_by_kernels if TRITON_INSTALLED else token_nll,
    )


def _mamba_ops(use_mamba_kernels: bool, grad_enabled: bool) -> MambaOps:
    """The kernels when wanted and installed, else the references. In training, mixer passes without padding or
    states run as one function whose backward writes in_proj's output gradient in one buffer: mamba-ssm's fused mixer
    function took a 1.3B step's forward and backward at 4 x 4K in 369 vs 374 ms and 34.2 vs 44.7 GiB against the
    kernels called one after another (H100, results/training_fusions.json). Where our single-pass SSD is the faster
    forward and no documents are packed, `training_mixer`'s pass, which keeps the chunk states and the convolution's
    output for the backward instead of computing them again, with our walk of the states' gradient: 344.4 vs 372.5 ms,
    48.9 vs 33.3 GiB, the loss the same to 4e-5 (H100, results/training_fusions_walk.json)."""
    if not use_mamba_kernels:
        return TORCH_OPS
    ops = kernel_ops(split_conv1d_scan=grad_enabled, training_pass=grad_enabled)
    if ops is None:
        _warn_kernels_missing()
        return TORCH_OPS
    return ops


@functools.cache
def _warn_kernels_missing() -> None:  # once per process
    warnings.warn(
        "mamba-ssm is not installed: the Mamba-2 layers run on the (slower) PyTorch path. "
        "`pip install diffuapriel-hf[cuda]` installs the kernels.",
        stacklevel=4,
    )


__all__ = [
    "DISPATCH_THRESHOLDS",
    "KernelPolicy",
    "REFERENCE_POLICY",
    "Threshold",
    "override_kernel_policy",
    "resolve_kernel_policy",
]
