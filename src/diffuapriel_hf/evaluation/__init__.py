"""Evaluation as the field does it, with EleutherAI's lm-evaluation-harness (the `[eval]` extra): `harness.py` holds the
lm-eval model `diffuapriel` (registered when it is imported), `command.py` the `diffuapriel eval` command, which runs
lm-eval's own command line with it, `parallelism.py` accuracy under parallelism (AUP), the speed-against-quality
score of a decoding setting, `doctests.py` a function's doctests run against a completion of it in a fenced
subprocess. This package imports nothing from lm-eval itself, so that `import diffuapriel_hf` works
without it."""

__all__ = []
