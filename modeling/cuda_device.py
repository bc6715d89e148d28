"""The card our Triton kernels launch on.

Triton launches a kernel on the current CUDA device, on that device's current stream, whatever device its tensors live
on. A model split over cards (`from_pretrained(..., device_map="auto")` places whole blocks, `_no_split_modules`)
runs a block on cuda:1 while cuda:0 is current: PyTorch's own operations follow their tensors, a Triton kernel would
not. Every launch of ours therefore runs under `on_device_of(one of its tensors)`, as mamba-ssm's launches do.
"""

import contextlib

import torch


def on_device_of(tensor: torch.Tensor):
    """The context to launch a kernel on `tensor`'s card in: that card made current where another one is, nothing
    otherwise (a tensor on the current card, or on the CPU under Triton's interpreter)."""
    if tensor.device.type != "cuda" or tensor.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)


__all__ = ["on_device_of"]
