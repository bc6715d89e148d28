"""Block diffusion generation with the exact cache (`BlockDiffusionCache`): a pass over one block against the cache
gives the logits of a pass over the whole sequence, and generate() gives the tokens of uncached whole-sequence
passes."""

import pytest
import torch

from diffuapriel_hf.modeling.cache import BlockDiffusionCache

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = 4


@pytest.fixture
def block_model(tiny_model):
    """A tiny block diffusion model (blocks of BLOCK tokens) of a stack's kind, three layers."""
    return lambda kind, **overrides: tiny_model(kind, 3, **{"block_size": BLOCK, **overrides})


def random_ids(config, batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, config.mask_token_id, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_a_block_against_the_cache_gives_the_whole_sequence_logits(block_model, stack, attn_implementation):
    model = block_model(stack, attn_implementation=attn_implementation)
    ids = random_ids(model.config, 2, 20, seed=0)
    mask = torch.ones_like(ids)
    mask[1, : 2 * BLOCK] = 0  # padding as whole blocks before a row's first token
    mask[0, 18:] = 0  # and at a row's end
    with torch.no_grad():
        whole = model(ids, attention_mask=mask).logits
        cache = BlockDiffusionCache(model.config, 2, 24)
        model(ids[:, :12], attention_mask=mask[:, :12], past_key_values=cache, use_cache=True)  # three blocks
        for start in (12, 16):
            window = slice(start, start + BLOCK)
            step = model(ids[:, window], attention_mask=mask[:, window], past_key_values=cache).logits
            real = mask[:, window].bool()
            torch.testing.assert_close(step[real], whole[:, window][real], rtol=0, atol=1e-5)
            assert cache.length == start  # a step reads the cache and leaves it as it was
            model(ids[:, window], attention_mask=mask[:, window], past_key_values=cache, use_cache=True)
        assert cache.length == 20 and cache.positions.tolist() == [18, 12]


def test_the_cache_refuses_passes_that_do_not_fit(block_model):
    model = block_model("hybrid")
    cache = BlockDiffusionCache(model.config, 1, 8)
    ids = random_ids(model.config, 1, 8, seed=1)
    with pytest.raises(ValueError, match="whole blocks"):
        model(ids[:, :3], past_key_values=cache)
    with pytest.raises(ValueError, match="batch 1"):
        model(ids.repeat(2, 1)[:, :4], past_key_values=cache)
    model(ids, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="do not fit"):
        model(ids[:, :4], past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="block_size"):
        BlockDiffusionCache(block_model("mamba", block_size=None).config, 1, 8)
    with pytest.raises(ValueError, match="multiple of the block size"):
        BlockDiffusionCache(model.config, 1, 6)
    with pytest.raises(ValueError, match="its block size"):
        block_model("mamba", block_size=2)(ids[:, :4], past_key_values=BlockDiffusionCache(model.config, 1, 8))
