"""Training and evaluation: the masked-diffusion data collator, the `diffuapriel train` entry point over transformers'
Trainer, and held-out evaluation."""

from .data import DataCollatorForMaskedDiffusion

__all__ = ["DataCollatorForMaskedDiffusion"]
