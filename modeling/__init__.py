"""The DiffuApriel model runtime: configuration, presets, layers and model classes, the SSD and fused ops (PyTorch
references and kernels), diffusion math and generation. These files are also the Hub remote code: `save_pretrained`
copies them into a model folder, where they import one another relatively and never import `diffuapriel_hf`."""

__all__ = []
