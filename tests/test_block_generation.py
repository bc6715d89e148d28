"""Block diffusion generation with the exact cache (`BlockDiffusionCache`): a pass over one block against the cache
gives the logits of a pass over the whole sequence, and generate() gives the tokens of uncached whole-sequence
passes."""

import pytest
import torch
from transformers.testing_utils import CaptureLogger

from diffuapriel_hf import DiffuAprielForMaskedLM
from diffuapriel_hf.modeling import generation
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


def test_a_steps_keys_written_into_the_cache_change_no_later_pass(block_model):
    # Steps write their keys and values after the kept ones (the buffer is read in place): a step over other tokens,
    # wider than the block then consumed, leaves the logits of the later passes those of the whole sequence.
    model = block_model("hybrid")
    ids, other = random_ids(model.config, 1, 16, seed=2), random_ids(model.config, 1, 16, seed=3)
    with torch.no_grad():
        whole = model(ids).logits
        cache = BlockDiffusionCache(model.config, 1, 16)
        model(ids[:, :4], past_key_values=cache, use_cache=True)
        model(other[:, 4:16], past_key_values=cache)  # a step over three blocks of other tokens
        model(ids[:, 4:8], past_key_values=cache, use_cache=True)
        step = model(ids[:, 8:12], past_key_values=cache).logits
    torch.testing.assert_close(step, whole[:, 8:12], rtol=0, atol=1e-5)


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
    with pytest.raises(ValueError, match="do not fit"):  # a step's keys are written at its positions too
        model(ids[:, :4], past_key_values=cache)
    with pytest.raises(ValueError, match="block_size"):
        BlockDiffusionCache(block_model("mamba", block_size=None).config, 1, 8)
    with pytest.raises(ValueError, match="multiple of the block size"):
        BlockDiffusionCache(model.config, 1, 6)
    with pytest.raises(ValueError, match="its block size"):
        block_model("mamba", block_size=2)(ids[:, :4], past_key_values=BlockDiffusionCache(model.config, 1, 8))


# ----------------------------------------------------------------------------------------------------------------------
# generate() on a block model: the exact cache against whole-sequence passes.

from transformers import StoppingCriteria, StoppingCriteriaList  # noqa: E402

from diffuapriel_hf.modeling import denoisers  # noqa: E402
from diffuapriel_hf.modeling.generation_plan import plan_block_generation  # noqa: E402

SAMPLERS = {
    "low_confidence": dict(),
    "steps": dict(steps=7),
    "margin_threshold": dict(remasking="margin", confidence_threshold=0.3),
    "entropy": dict(remasking="entropy", steps=9),
    "random": dict(remasking="random", seed=5),
    "ancestral": dict(remasking="ancestral", steps=8, seed=5),
    "sampling": dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=11),
}


def left_padded_prompts(config, lengths: list[int], seed: int):
    """Prompts of `lengths` tokens, left-padded to the longest, and their attention mask."""
    width = max(lengths)
    ids = random_ids(config, len(lengths), width, seed)
    mask = torch.ones_like(ids)
    for row, length in enumerate(lengths):
        mask[row, : width - length] = 0
        ids[row, : width - length] = config.pad_token_id
    return ids, mask


class LogitsRecorder:
    """The logits of every denoising step's pass (a forward hook on the model): passes that consume blocks into the
    cache are left out."""

    def __init__(self, model):
        self.logits = []
        self.handle = model.register_forward_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs, output):
        if not kwargs.get("use_cache"):
            self.logits.append(output.logits)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_exact_cache_gives_the_tokens_and_logits_of_whole_sequence_passes(block_model, stack, sampler):
    model = block_model(stack, attn_implementation="eager", sharpen=30.0)
    ids, mask = left_padded_prompts(model.config, [10], seed=2)
    settings = dict(max_new_tokens=11, eos_token_id=None, return_dict_in_generate=True, **SAMPLERS[sampler])
    recorded = {}
    for use_cache in (True, False):
        recorder = LogitsRecorder(model)
        recorded[use_cache] = model.generate(ids, attention_mask=mask, use_cache=use_cache, **settings), recorder.logits
        recorder.handle.remove()
    (cached, cached_logits), (whole, whole_logits) = recorded[True], recorded[False]
    assert torch.equal(cached.sequences, whole.sequences)
    assert cached.num_forward_passes == whole.num_forward_passes == len(whole_logits) == len(cached_logits)
    for step, reference in zip(cached_logits, whole_logits):  # a step's block alone; the whole pass keeps the window
        torch.testing.assert_close(step[:, -reference.shape[1] :], reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("settings", [dict(), dict(steps=9), dict(confidence_threshold=0.4), dict(do_sample=True,
                                                                                                  seed=3)])
def test_a_left_padded_batch_gives_what_each_prompt_gives_alone(block_model, stack, settings):
    model = block_model(stack, sharpen=30.0)
    lengths = [10, 3, 8, 1]  # ending at every offset inside a block of four
    ids, mask = left_padded_prompts(model.config, lengths, seed=4)
    ids[2, -3] = model.config.mask_token_id  # an infilling mask in a prompt block
    settings = dict(max_new_tokens=9, eos_token_id=None, **settings)
    batch = model.generate(ids, attention_mask=mask, **settings)
    for row, length in enumerate(lengths):
        alone = model.generate(ids[row : row + 1, ids.shape[1] - length :], **settings)
        assert torch.equal(batch[row, ids.shape[1] - length :], alone[0]), row
    assert not (batch == model.config.mask_token_id).any()


def test_prompt_blocks_with_masks_are_denoised_in_turn(block_model):
    model = block_model("hybrid", sharpen=30.0)
    ids = random_ids(model.config, 1, 14, seed=6)
    ids[0, [1, 9]] = model.config.mask_token_id  # in the first and third blocks of the prompt
    steps = []
    settings = dict(max_new_tokens=4, eos_token_id=None)
    out = model.generate(ids, on_step=lambda report: steps.append(report.window), **settings)
    reference = model.generate(ids, use_cache=False, **settings)
    assert torch.equal(out, reference) and not (out == model.config.mask_token_id).any()
    # Each masked block alone, in order (one mask a step), then the new tokens: the prompt's last two join block 3.
    assert [window.stop for window in steps] == [4, 12, 16, 16, 20, 20]
    torch.testing.assert_close(out[0, [0, 2, 3, 4, 8, 10]], ids[0, [0, 2, 3, 4, 8, 10]])


def test_a_long_prompt_is_consumed_in_chunks_with_the_same_tokens(block_model, monkeypatch):
    model = block_model("hybrid", sharpen=30.0)
    ids = random_ids(model.config, 2, 23, seed=7)
    whole = model.generate(ids, max_new_tokens=6, eos_token_id=None)
    monkeypatch.setattr(denoisers, "PREFILL_CHUNK", BLOCK)  # a pass per block
    assert torch.equal(model.generate(ids, max_new_tokens=6, eos_token_id=None), whole)


def test_block_generation_options_and_refusals(block_model):
    model = block_model("mamba", sharpen=4.0)
    ids = random_ids(model.config, 1, 6, seed=8)
    settings = dict(max_new_tokens=13, do_sample=True, seed=7, eos_token_id=None, pad_token_id=0)
    free = model.generate(ids, **settings)
    assert free.shape == (1, 19)  # any length: the prompt's last two tokens join the first block

    class AfterNine(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 6 + 9)

    stopped = model.generate(ids, stopping_criteria=StoppingCriteriaList([AfterNine()]), **settings)
    assert torch.equal(stopped[:, :15], free[:, :15]) and stopped[:, 15:].eq(0).all()
    history = model.generate(ids, output_history=True, return_dict_in_generate=True, **settings).history
    assert all(state.shape == (1, 19) for state in history) and torch.equal(history[-1], free)
    pieces = []

    class Recorder:
        def put(self, tokens):
            pieces.append(tokens)

        def end(self):
            pass

    assert torch.equal(model.generate(ids, streamer=Recorder(), **settings), free)
    # The prompt, then each block's new tokens: two join the prompt's last two in its block, then blocks of four.
    assert [p.shape[1] for p in pieces] == [6, 2, 4, 4, 3] and torch.equal(torch.cat(pieces, dim=1), free)
    copies = model.generate(ids, num_return_sequences=2, **settings)
    assert copies.shape == (2, 19) and torch.equal(copies[0], free[0])
    with pytest.raises(ValueError, match="block_length"):
        model.generate(ids, max_new_tokens=8, block_length=8)
    with pytest.raises(ValueError, match="use_block_cache"):
        model.generate(ids, max_new_tokens=8, use_block_cache=True)


def test_the_block_plan_places_rows_on_common_blocks():
    plan = plan_block_generation([10, 3, 8], 10, [[], [8], []], 6, None, None, None, 4)
    # Row 0's prompt ends two tokens into its third block, row 1's three tokens into its first, row 2's at a block's
    # end: their last prompt blocks share the canvas block [8, 12).
    assert plan.offsets == (0, 1, -2) and plan.width == 20
    assert plan.blocks == ((8, 12), (12, 16), (16, 20))
    stepped = plan_block_generation([10, 3, 8], 10, [[], [8], []], 6, None, None, 7, 4)
    # Each row spreads its seven steps over its own masks: row 0 has 2 + 4 + 0 of them in the three blocks, row 1 (its
    # infilling mask at canvas column 9) 2 + 4 + 1, row 2 4 + 2 + 0; a block takes its busiest row's steps.
    assert stepped.row_steps == ((3, 4, 0), (3, 3, 1), (5, 2, 0)) and stepped.steps == (5, 4, 1)
    with pytest.raises(ValueError, match="fewer than the blocks"):
        plan_block_generation([10], 10, [[]], 12, None, None, 2, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["mamba", "hybrid", "attention"])
@torch.no_grad()
def test_cuda_steps_replay_one_graph_without_host_synchronisation(block_model, kind):
    model = block_model(kind, sharpen=30.0).cuda()
    canvas = random_ids(model.config, 2, 28, seed=9).cuda()
    eager = denoisers.ExactCacheDenoiser(model, None, graphs=False)
    graphed = denoisers.ExactCacheDenoiser(model, None, graphs=True)
    # Committed blocks are consumed eagerly (the first), captured (the second), then replayed: the steps after them
    # check what the graphs left in the cache.
    for block in (slice(8, 12), slice(12, 16), slice(16, 20), slice(20, 24), slice(24, 28)):
        for denoiser in (eager, graphed):
            denoiser.start_block(block)
        for step in range(3):
            canvas[:, block.start + step] = model.config.mask_token_id  # the block's tokens change between steps
            reference = eager(canvas)
            if step == 0:  # the first step of the first block consumes the prompt and captures the graph
                logits = graphed(canvas)
            else:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    logits = graphed(canvas)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)
        assert denoisers.graphed_denoiser(model).graph is not None  # replayed, not run eagerly
        for denoiser in (eager, graphed):
            denoiser.finish_block(canvas)
    cache = graphed.cache
    assert cache.length == eager.cache.length == 28 and denoisers.graphed_denoiser(model)._consume is not None
    assert cache is denoisers.graphed_denoiser(model).block_diffusion_cache(2, 28)  # kept for the next generation
    ids = random_ids(model.config, 2, 9, seed=10).cuda()
    settings = dict(max_new_tokens=14, eos_token_id=None)
    assert torch.equal(model.generate(ids, **settings), model.generate(ids, use_cache=False, **settings))
    ids, mask = (t.cuda() for t in left_padded_prompts(model.config, [9, 6], seed=13))  # graphs with padding
    cached = model.generate(ids, attention_mask=mask, **settings)
    assert torch.equal(cached, model.generate(ids, attention_mask=mask, use_cache=False, **settings))


def test_cache_passes_without_padding_skip_the_mamba_padding_path(block_model):
    """A step of 32 tokens is bound by its launches, and the padding path adds some: only a padded pass takes it."""
    model = block_model("hybrid")
    masks = []
    hooks = [layer.mixer.left_to_right.register_forward_pre_hook(lambda module, args: masks.append(args[1]))
             for layer in model.model.layers if hasattr(layer.mixer, "left_to_right")]
    ids = random_ids(model.config, 2, 9, seed=14)
    model.generate(ids, max_new_tokens=7, eos_token_id=None)
    assert masks and all(mask is None for mask in masks)
    masks.clear()
    ids, mask = left_padded_prompts(model.config, [9, 6], seed=14)
    model.generate(ids, attention_mask=mask, max_new_tokens=7, eos_token_id=None)
    assert not masks[0].all()  # the prompt's pass, padded (later ones are not: a mask of ones on the CPU is dropped)
    for hook in hooks:
        hook.remove()


def test_the_exact_cache_is_the_default(block_model):
    model = block_model("mamba")
    passes = []
    handle = model.register_forward_hook(
        lambda module, args, kwargs, output: passes.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    model.generate(random_ids(model.config, 1, 9, seed=12), max_new_tokens=7, eos_token_id=None)
    handle.remove()
    # The prompt's two complete blocks in one pass, then every step on a block of four, and a pass per committed block.
    assert passes[0] == 2 * BLOCK and set(passes[1:]) == {BLOCK}


def test_a_full_sequence_folder_loaded_as_a_block_model_generates_its_own_blocks(tiny_model, tmp_path):
    # As the shipped full-sequence model does, the folder's generation config sets the length, steps and generation
    # blocks (block_length), which a block model refuses.
    full = tiny_model("mamba")
    full.generation_config.update(max_new_tokens=12, steps=12, block_length=4)
    full.save_pretrained(tmp_path / "full")
    with CaptureLogger(generation.logger) as captured:
        model = DiffuAprielForMaskedLM.from_pretrained(tmp_path / "full", block_size=8)
    assert torch.equal(model.generate(), model.generate(block_length=None))
    assert model.config.block_size == 8 and model.generation_config.block_length is None
    assert "block_length 4" in captured.out


def test_a_block_folders_own_block_length_is_kept(tiny_model, tmp_path):
    block = tiny_model("mamba", block_size=8)
    block.generation_config.block_length = 8
    block.save_pretrained(tmp_path / "block")
    assert DiffuAprielForMaskedLM.from_pretrained(tmp_path / "block").generation_config.block_length == 8
