"""Diffusion sampling for `DiffuAprielForMaskedLM.generate` (filled in by the generation work)."""


class DiffusionGenerationMixin:
    pass
