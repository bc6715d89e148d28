"""The block cache: `BlockContext` records what the positions outside a window contribute to each
layer, so that passes over the window alone can stand in for whole-sequence passes; `use_block_cache` in generate()."""

import pytest
import torch

from diffuapriel_hf import DiffusionGenerationConfig
from diffuapriel_hf.modeling.configuration_diffuapriel import ATTENTION, MAMBA
from diffuapriel_hf.modeling.cache import BlockContext
from diffuapriel_hf.modeling.mamba_ops import TORCH_OPS

pytestmark = pytest.mark.usefixtures("one_thread")

# Windows inside the tiny preset's 8-token SSD chunks and across them, at the sequence's start and end, and all of it.
WINDOWS = [(10, 18), (0, 8), (29, 40), (0, 40)]


def left_padded_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 95, (2, 40), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    ids[1, :6] = 0
    return ids, mask


@pytest.mark.parametrize("window", WINDOWS)
def test_window_pass_after_recording_gives_the_whole_pass_logits(stack, window, tiny_model):
    model = tiny_model(stack)
    ids, mask = left_padded_batch()
    start, end = window
    context = BlockContext(start, end)
    with torch.no_grad():
        whole = model(ids, attention_mask=mask).logits
        recording = model(ids, attention_mask=mask, block_context=context).logits
        window_logits = model(ids[:, start:end], block_context=context).logits
    assert context.recorded and context.length == 40
    torch.testing.assert_close(recording, whole, rtol=0, atol=1e-5)  # splitting the scans changes nothing
    torch.testing.assert_close(window_logits, whole[:, start:end], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind, bidirectional", [("mamba", True), ("mamba", False), ("attention", True)])
def test_one_layer_window_pass_stays_exact_after_the_window_changes(kind, bidirectional, tiny_model):
    """With one layer, the outside positions' inputs are their embeddings, which the window cannot change: the window
    pass must then equal a whole pass on the new sequence, so the recorded states and keys are used as they should."""
    model = tiny_model([MAMBA] if kind == "mamba" else [ATTENTION], bidirectional=bidirectional)
    ids, mask = left_padded_batch(seed=1)
    context = BlockContext(12, 21)
    with torch.no_grad():
        model(ids, attention_mask=mask, block_context=context)
        changed = ids.clone()
        changed[:, 12:21] = torch.randint(3, 95, (2, 9), generator=torch.Generator().manual_seed(2))
        window_logits = model(changed[:, 12:21], block_context=context).logits
        whole = model(changed, attention_mask=mask).logits
    torch.testing.assert_close(window_logits, whole[:, 12:21], rtol=0, atol=1e-5)


def test_window_passes_of_a_deeper_model_are_an_approximation_that_stays_close(tiny_model):
    model = tiny_model("hybrid")
    ids, mask = left_padded_batch(seed=3)
    context = BlockContext(16, 24)
    with torch.no_grad():
        model(ids, attention_mask=mask, block_context=context)
        changed = ids.clone()
        changed[:, 16:20] = 7
        approximate = model(changed[:, 16:24], block_context=context).logits
        exact = model(changed, attention_mask=mask).logits[:, 16:24]
    assert torch.isfinite(approximate).all()
    assert not torch.allclose(approximate, exact, atol=1e-6)  # the outside context is stale...
    assert (approximate - exact).abs().max() < 0.1 * exact.abs().max()  # ...but close


def test_an_unpadded_window_pass_reads_only_the_recorded_tensors(stack, tiny_model):
    """What a CUDA graph of window passes relies on: another window's recording copied into a context of the same
    shapes, wherever that context's own window lies, gives that other window's logits."""
    model = tiny_model(stack)
    ids = left_padded_batch()[0][:, 6:]  # (2, 34), no padding
    first, second = BlockContext(3, 11), BlockContext(20, 28)
    with torch.no_grad():
        for context in (first, second):
            model(ids, block_context=context)
        expected = model(ids[:, 20:28], block_context=second).logits
        twin = first.clone()  # what GraphedDenoiser.window does: a private copy of a recording, then refilled
        for mine, original, theirs in zip(twin.recorded_tensors(), first.recorded_tensors(),
                                          second.recorded_tensors(), strict=True):
            assert mine.data_ptr() != original.data_ptr()
            mine.copy_(theirs)
        copied = model(ids[:, 20:28], block_context=twin).logits
    assert len(twin.recorded_tensors()) == {"mamba": 8, "hybrid": 7, "attention": 5}[stack]
    torch.testing.assert_close(copied, expected, rtol=0, atol=0)


@pytest.mark.parametrize("state_at", [0, 5, 16, 21, 40])
def test_a_mamba_direction_continues_from_the_state_it_reports(state_at, tiny_model):
    """`state_at` splits only the scan: the output is the whole pass's, and a pass over the tokens from `state_at` on,
    started from the reported state, gives the rest of it (at 40, the state the sequence leaves, continued by more)."""
    model = tiny_model("mamba")
    direction = model.model.layers[0].mixer.left_to_right
    ops = TORCH_OPS
    hidden, more = torch.randn(2, 40, model.config.hidden_size), torch.randn(2, 6, model.config.hidden_size)
    with torch.no_grad():
        whole = direction(torch.cat([hidden, more], dim=1), None, ops)
        output, state = direction(hidden, None, ops, state_at=state_at)
        continued = direction(torch.cat([hidden, more], dim=1)[:, state_at:], None, ops, initial_state=state)
    torch.testing.assert_close(output, whole[:, :40], rtol=0, atol=1e-5)
    torch.testing.assert_close(continued, whole[:, state_at:], rtol=0, atol=1e-5)


def test_block_context_refuses_bad_windows_and_inputs(tiny_model):
    model = tiny_model("hybrid")
    ids, mask = left_padded_batch()
    with pytest.raises(ValueError, match="0 <= start < end"):
        BlockContext(5, 5)
    with pytest.raises(TypeError, match="integer start and end"):
        BlockContext(0, 4.0)
    with torch.no_grad():
        with pytest.raises(ValueError, match="does not fit a sequence of 40"):
            model(ids, block_context=BlockContext(30, 41))
        context = BlockContext(8, 16)
        model(ids, attention_mask=mask, block_context=context)
        with pytest.raises(ValueError, match=r"window's tokens alone, \(batch, end - start\) = \(2, 8\), got \(2, 40\)"):
            model(ids, block_context=context)
        with pytest.raises(ValueError, match="got \\(1, 8\\)"):
            model(ids[:1, 8:16], block_context=context)
        with pytest.raises(ValueError, match="attention_mask=None"):
            model(ids[:, 8:16], attention_mask=mask[:, 8:16], block_context=context)
        with pytest.raises(TypeError, match="must be a BlockContext"):
            model(ids, block_context=(8, 16))


def generate(model, prompt, attention_mask=None, **kwargs):
    settings = dict(max_new_tokens=16, block_length=8, steps=8, do_sample=True, seed=4, return_dict_in_generate=True)
    settings.update(kwargs)
    return model.generate(prompt, attention_mask=attention_mask, **settings)


@pytest.mark.parametrize("kind", ["mamba", "hybrid"])
@pytest.mark.parametrize("remasking", ["low_confidence", "ancestral"])
def test_generate_with_one_step_per_block_is_unchanged_by_the_cache(kind, remasking, tiny_model):
    """One step per block: the cache is recorded and never reused, so the tokens are those of plain generation."""
    model = tiny_model(kind)
    prompt = torch.randint(3, 95, (2, 10), generator=torch.Generator().manual_seed(5))
    plain = generate(model, prompt, steps=2, remasking=remasking)
    cached = generate(model, prompt, steps=2, remasking=remasking, use_block_cache=True)
    assert torch.equal(plain.sequences, cached.sequences)
    assert plain.num_forward_passes == cached.num_forward_passes


@pytest.mark.parametrize("kind", ["mamba", "hybrid"])
def test_generate_with_the_cache_fills_every_mask_and_keeps_the_prompt(kind, tiny_model):
    model = tiny_model(kind)
    config = model.config
    prompt = torch.randint(3, config.mask_token_id, (2, 10), generator=torch.Generator().manual_seed(6))
    out = generate(model, prompt, max_new_tokens=24, steps=12, use_block_cache=True)
    assert torch.equal(out.sequences[:, :10], prompt)
    assert not (out.sequences == config.mask_token_id).any()
    assert out.num_forward_passes == 12


def test_generate_with_the_cache_gives_a_padded_batch_the_tokens_of_each_prompt_alone(tiny_model):
    model = tiny_model("hybrid")
    generator = torch.Generator().manual_seed(7)
    long, short = torch.randint(3, 95, (1, 12), generator=generator), torch.randint(3, 95, (1, 7), generator=generator)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 5, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    together = generate(model, batch, attention_mask=mask, use_block_cache=True).sequences
    for row, prompt in enumerate((long, short)):
        alone = generate(model, prompt, use_block_cache=True).sequences[0]
        assert torch.equal(together[row, -alone.shape[0] :], alone)


def test_infilling_with_the_cache_fills_the_prompt_masks(tiny_model):
    model = tiny_model("mamba")
    mask_id = model.config.mask_token_id
    prompt = torch.randint(3, mask_id, (1, 12), generator=torch.Generator().manual_seed(8))
    prompt[0, [3, 4]] = mask_id
    out = generate(model, prompt, use_block_cache=True).sequences
    assert not (out == mask_id).any()
    keep = torch.ones(12, dtype=torch.bool)
    keep[[3, 4]] = False
    assert torch.equal(out[0, :12][keep], prompt[0][keep])


def test_use_block_cache_is_a_saved_generation_setting(tmp_path):
    config = DiffusionGenerationConfig(use_block_cache=True, steps=8)
    config.save_pretrained(tmp_path)
    assert DiffusionGenerationConfig.from_pretrained(tmp_path).use_block_cache is True
    with pytest.raises(ValueError, match="`use_block_cache` must be a bool"):
        DiffusionGenerationConfig(use_block_cache="yes")
