"""The MDLM loss's -log p(label) over the LM head's logits in two Triton kernels, with no float32 copy of the logits.

`diffusion.token_nll` (the reference, same signature) copies the logits to float32 to write the mask token's -inf
into them, then cross-entropy writes the float32 log-probabilities, and its backward the float32 gradient, cast back
to the logits' dtype. For the labelled positions of a 1.3B training step at 16K tokens (8,192 rows of GPT-2's 50,258
tokens) each float32 copy weighs 1.6 GB; those copies and passes took about 8 ms of a 344 ms step on an H100
(benchmarks/results/profile_train_4k_waits.json: the copies, the softmax forward and backward). Here one program per
row walks its logits in blocks:

- forward: the running maximum and sum of exp over every token but the mask token (an online logsumexp, float32),
  then -log p(label) = logsumexp - logit(label); it keeps logsumexp per row for the backward;
- backward: the row's gradient, upstream * (softmax - onehot(label)), the mask token's 0, written once in the
  logits' dtype.

Rows whose label is -100 give 0 and a zero gradient, and read no logits. Training's default on CUDA
(`KernelPolicy.token_nll`): with training_mixer's dx and gated-norm backward kernels, a 1.3B step's forward and
backward took 321.8 against 328.9 ms at 4 x 4K, the loss the same (H200, results/compare_training_kernels_4k.json).
"""

import torch

from .cuda_device import on_device_of
from .diffusion import token_nll as token_nll_reference

try:  # installed with mamba-ssm (and by PyTorch's CUDA wheels); without it, the reference
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK_V = 2048  # logits per load: 8 KB of float32 per program in flight, 4 warps


def token_nll(logits: torch.Tensor, labels: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """`diffusion.token_nll` by the kernels where they apply (CUDA, Triton, a floating dtype, the vocabulary axis
    contiguous), else by the reference. logits (..., V), labels (...); returns (...) float32."""
    if triton is None or not logits.is_cuda or not logits.is_floating_point() or logits.stride(-1) != 1:
        return token_nll_reference(logits, labels, mask_token_id)
    rows = logits.reshape(-1, logits.shape[-1])  # a view where the rows are evenly spaced, as the head's slice is
    return TokenNLL.apply(rows, labels.reshape(-1).contiguous(), mask_token_id).view(labels.shape)


class TokenNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, mask_token_id):
        nll, logsumexp = launch_token_nll(logits, labels, mask_token_id)
        ctx.save_for_backward(logits, labels, logsumexp)
        ctx.mask_token_id = mask_token_id
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        logits, labels, logsumexp = ctx.saved_tensors
        grad = launch_token_nll_backward(logits, labels, logsumexp, grad_nll.contiguous(), ctx.mask_token_id)
        return grad, None, None


def launch_token_nll(logits, labels, mask_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel, without the checks: logits (N, V), the last axis contiguous; labels (N,) integers, -100
    where nothing is predicted. Returns (-log p(label), logsumexp over the tokens but the mask), each (N,) float32."""
    rows, vocab = logits.shape
    nll = torch.empty(rows, device=logits.device, dtype=torch.float32)
    logsumexp = torch.empty(rows, device=logits.device, dtype=torch.float32)
    with on_device_of(logits):
        _token_nll_kernel[(rows,)](logits, labels, nll, logsumexp, vocab, logits.stride(0), mask_token_id,
                                   BLOCK_V=BLOCK_V)
    return nll, logsumexp


def launch_token_nll_backward(logits, labels, logsumexp, grad_nll, mask_token_id: int) -> torch.Tensor:
    """The backward kernel, without the checks: the gradient of the logits (N, V), contiguous, in their dtype."""
    grad = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
    with on_device_of(logits):
        _token_nll_backward_kernel[(logits.shape[0],)](
            logits, labels, logsumexp, grad_nll, grad, logits.shape[1], logits.stride(0), mask_token_id,
            BLOCK_V=BLOCK_V)
    return grad


if triton is not None:

    @triton.jit
    def _token_nll_kernel(logits_ptr, labels_ptr, nll_ptr, logsumexp_ptr, vocab, stride_row, mask_token_id,
                          BLOCK_V: tl.constexpr):
        row = tl.program_id(0)
        label = tl.load(labels_ptr + row)
        labelled = label != -100
        read_to = tl.where(labelled, vocab, 0)  # an unlabelled row reads nothing
        logits_ptr += row.to(tl.int64) * stride_row
        offs = tl.arange(0, BLOCK_V)
        running_max = tl.full((), float("-inf"), tl.float32)
        running_sum = tl.zeros((), tl.float32)
        for start in range(0, vocab, BLOCK_V):
            token = start + offs
            counted = (token < read_to) & (token != mask_token_id)
            x = tl.load(logits_ptr + token, mask=counted, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            # Before any counted token (or in a row with none) the maximum is -inf: nothing to rescale or add.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), axis=0)
            running_max = new_max
        logsumexp = running_max + tl.log(tl.where(labelled, running_sum, 1.0))
        label_logit = tl.load(logits_ptr + tl.where(labelled, label, 0)).to(tl.float32)
        label_logit = tl.where(label == mask_token_id, float("-inf"), label_logit)  # as the reference: never [MASK]
        tl.store(nll_ptr + row, tl.where(labelled, logsumexp - label_logit, 0.0))
        tl.store(logsumexp_ptr + row, tl.where(labelled, logsumexp, 0.0))

    @triton.jit
    def _token_nll_backward_kernel(logits_ptr, labels_ptr, logsumexp_ptr, grad_nll_ptr, grad_ptr, vocab, stride_row,
                                   mask_token_id, BLOCK_V: tl.constexpr):
        row = tl.program_id(0)
        label = tl.load(labels_ptr + row)
        labelled = label != -100
        logsumexp = tl.load(logsumexp_ptr + row)
        upstream = tl.where(labelled, tl.load(grad_nll_ptr + row), 0.0)
        read_to = tl.where(labelled, vocab, 0)  # an unlabelled row reads nothing and writes zeros
        logits_ptr += row.to(tl.int64) * stride_row
        grad_ptr += row.to(tl.int64) * vocab
        offs = tl.arange(0, BLOCK_V)
        for start in range(0, vocab, BLOCK_V):
            token = start + offs
            counted = (token < read_to) & (token != mask_token_id)
            x = tl.load(logits_ptr + token, mask=counted, other=float("-inf")).to(tl.float32)
            probability = tl.exp(x - logsumexp)  # 0 where not counted
            grad = upstream * (probability - tl.where(token == label, 1.0, 0.0))
            tl.store(grad_ptr + token, grad.to(grad_ptr.dtype.element_ty), mask=token < vocab)


__all__ = ["launch_token_nll", "launch_token_nll_backward", "token_nll", "TokenNLL"]
