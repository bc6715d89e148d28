"""The exact cache's attention kernel (`cache_attention.py`) on the CPU, run by Triton's interpreter
(TRITON_INTERPRET=1): the kernel against its reference over tiles, splits of the key range, grouped heads, padding and
queries that see no key; and block models generating through it, against the attention implementation under the
cache's mask and against whole-sequence passes. The compiled kernel in bf16 and under CUDA graphs is tested on a GPU
(`test_gpu_kernels.py`)."""


import pytest
import torch

from conftest import build_tiny_model
from test_block_generation import LogitsRecorder

from diffuapriel_hf.modeling.cache_attention import cache_attention_reference, visible_keys
from diffuapriel_hf.modeling.kernel_policy import override_kernel_policy

pytest.importorskip("triton")

# (batch, heads, key-value heads, queries, buffer length, head dim, block size, start, splits, BLOCK_M, BLOCK_N):
# queries over several blocks and tiles, the key range split in parts (some of them empty), grouped heads, a head
# dimension under the smallest tile, a start that is not a multiple of the key tile.
CASES = [
    (2, 4, 2, 40, 128, 8, 8, 32, 1, 16, 16),
    (2, 4, 2, 8, 96, 8, 8, 48, 3, 16, 16),
    (1, 2, 1, 64, 256, 32, 16, 96, 2, 32, 32),
    (2, 4, 4, 24, 80, 16, 8, 40, 4, 32, 16),
    (1, 2, 2, 4, 64, 24, 4, 12, 8, 16, 16),
]


def kernel_inputs(batch, heads, kv_heads, width, length, head_dim, block_size, start, seed=0):
    """Queries as the attention layer passes them (a transposed view), a buffer, and key validity with a row whose
    first block of queries sees no key at all."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, width, heads, head_dim, generator=generator).transpose(1, 2)
    key, value = (torch.randn(batch, kv_heads, length, head_dim, generator=generator) for _ in "kv")
    valid = torch.rand(batch, length, generator=generator) < 0.8
    if batch > 1:
        valid[1, : start + block_size] = False
    return query, key, value, valid, torch.tensor(start)


def generations(kind: str) -> dict:
    """A tiny block model of `kind` generating for a left-padded batch with the exact cache through the kernel, through
    the attention implementation (sdpa) under the cache's mask, and with whole-sequence passes: the tokens, and the
    logits of every denoising step (passes that consume blocks left out)."""
    model = build_tiny_model(kind, 3, block_size=4, sharpen=30.0)
    ids = torch.randint(3, model.config.mask_token_id, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    outputs = {}
    for name, use_cache, kernel in (("kernel", True, True), ("implementation", True, False), ("whole", False, False)):
        recorder = LogitsRecorder(model)
        with override_kernel_policy(cache_attention=kernel):
            tokens = model.generate(ids, attention_mask=mask, use_cache=use_cache, max_new_tokens=9, steps=9,
                                    eos_token_id=None)
        recorder.handle.remove()
        outputs[name] = tokens, recorder.logits
    return outputs


def interpreted_checks() -> dict:
    """Run every case in this process (which must have TRITON_INTERPRET=1 set before triton was first imported)."""
    from diffuapriel_hf.modeling.cache_attention import launch_cache_attention

    torch.set_num_threads(1)
    errors = {}
    for index, (*sizes, splits, block_m, block_n) in enumerate(CASES):
        query, key, value, valid, start = kernel_inputs(*sizes)
        scaling = query.shape[-1] ** -0.5
        out = launch_cache_attention(query, key, value, valid, start, sizes[6], scaling, splits, block_m, block_n, 4,
                                     1)
        expected = cache_attention_reference(query, key, value, valid, start, sizes[6], scaling)
        errors[index] = (out - expected).abs().max().item()
    models = {}
    for kind in ("hybrid", "attention"):
        outputs = generations(kind)
        tokens, logits = outputs["kernel"]
        models[kind] = dict(
            same_tokens={name: bool(torch.equal(tokens, other)) for name, (other, _) in outputs.items()},
            # A cached step's logits cover its block; a whole-sequence pass keeps the window, the block's end.
            logits_error={name: max((a[:, -b.shape[1]:] - b).abs().max().item() for a, b in zip(logits, other))
                          for name, (_, other) in outputs.items() if name != "kernel"},
            steps={name: len(other) for name, (_, other) in outputs.items()},
        )
    return dict(errors=errors, models=models)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_interpreted_kernel_matches_the_reference(interpreted, case):
    assert interpreted["errors"][str(case)] <= 1e-5


@pytest.mark.parametrize("kind", ["hybrid", "attention"])
def test_block_models_generate_the_same_through_the_kernel(interpreted, kind):
    result = interpreted["models"][kind]
    assert result["same_tokens"] == {"kernel": True, "implementation": True, "whole": True}
    assert result["logits_error"]["implementation"] <= 1e-5 and result["logits_error"]["whole"] <= 1e-5
    assert result["steps"]["kernel"] == result["steps"]["whole"] >= 9


def test_the_reference_follows_the_block_rule():
    # Query i at buffer position start + i sees the valid keys of its block and the blocks before it, nothing after.
    valid = torch.tensor([[True, False, True, True, True, True, True, True]])
    seen = visible_keys(valid, torch.tensor(2), 4, block_size=2)[0]
    assert seen.tolist() == [[True, False, True, True, False, False, False, False]] * 2 + [
        [True, False, True, True, True, True, False, False]] * 2
    query, key, value, valid, start = kernel_inputs(1, 2, 1, 4, 16, 8, 4, 8)
    out = cache_attention_reference(query, key, value, valid, start, 4, 1.0)
    value[:, :, 12:] = 1e3  # keys after the queries' block: nothing changes
    torch.testing.assert_close(cache_attention_reference(query, key, value, valid, start, 4, 1.0), out)
    valid[:] = False  # no key seen: zeros
    assert not cache_attention_reference(query, key, value, valid, start, 4, 1.0).any()
