"""Diffusion generation: config, sampling math, generate() and the fill-mask pipeline."""

import json

import pytest
import torch
from transformers import (
    AutoModelForMaskedLM,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TextDiffusionStreamer,
    TextStreamer,
    pipeline,
)

from diffuapriel_hf import DiffuAprielForMaskedLM, DiffusionGenerationConfig
from diffuapriel_hf.modeling.denoisers import BlockCacheDenoiser, EagerDenoiser
from diffuapriel_hf.modeling import generation
from diffuapriel_hf.modeling.generation import DiffusionGenerateOutput, candidate_sampler
from diffuapriel_hf.modeling.generation_plan import HONOURED_OPTIONS, GenerationPlan, plan_generation
from diffuapriel_hf.modeling.sampling import (
    CandidateSampler,
    ancestral_reveal_probability,
    choose_commits,
    confidence_scores,
    num_tokens_to_commit,
    pad_after_eos,
    propose_tokens,
    sample_categorical,
    select_top,
)

pytestmark = pytest.mark.usefixtures("one_thread")




def random_ids(model, *shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    first_word = model.config.eos_token_id + 1  # ids below are pad / bos / eos in the tiny preset
    return torch.randint(first_word, model.config.mask_token_id, shape, generator=generator)


def left_pad(model, prompts):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), model.config.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def states(initial, output):
    """The sequence before the first step and after every step."""
    return [initial] + list(output.history)


# ----------------------------------------------------------------------------------------------------------------------
# The config


def test_model_generation_config_is_built_from_the_model_config(tiny_model):
    model = tiny_model()
    gc = model.generation_config
    assert isinstance(gc, DiffusionGenerationConfig)
    config = model.config
    assert (gc.mask_token_id, gc.pad_token_id, gc.bos_token_id, gc.eos_token_id) == (
        config.mask_token_id, config.pad_token_id, config.bos_token_id, config.eos_token_id,
    )
    assert gc.remasking == "low_confidence" and gc.steps is None and gc.block_length is None


@pytest.mark.parametrize(
    "settings, argument",
    [
        (dict(steps=0), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(block_length=0), "block_length"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(remasking="lowest"), "remasking"),
        (dict(confidence_threshold=1.5), "confidence_threshold"),
        (dict(confidence_threshold=0.9, remasking="ancestral"), "confidence_threshold"),
        (dict(mask_token_id=-3), "mask_token_id"),
    ],
)
def test_config_validation_names_the_argument(settings, argument, tiny_model):
    with pytest.raises(ValueError, match=argument):
        DiffusionGenerationConfig(**settings)
    model = tiny_model()
    with pytest.raises(ValueError, match=argument):  # the same checks for per-call overrides
        model.generate(random_ids(model, 1, 4), max_new_tokens=4, **settings)


@pytest.mark.parametrize(
    "call, argument",
    [
        (dict(max_new_tokens=10, block_length=4, steps=2), "--steps|`steps` \\(2\\) is fewer than the blocks \\(3\\)"),
        (dict(max_length=3), "max_length"),
        (dict(max_length=6), "max_length"),  # exactly the prompt, nothing to fill
        (dict(max_new_tokens=300), "max_position_embeddings"),
        (dict(), "max_new_tokens"),  # no length and no mask in the prompt
        (dict(max_new_tokens=4, numbr_of_steps=3), "numbr_of_steps"),
    ],
)
def test_generate_validation_names_the_argument(call, argument, tiny_model):
    model = tiny_model()
    with pytest.raises(ValueError, match=argument):
        model.generate(random_ids(model, 1, 6), **call)


def test_right_padding_is_refused(tiny_model):
    model = tiny_model()
    ids = random_ids(model, 2, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4)


@pytest.mark.parametrize("remasking", ["low_confidence", "ancestral"])
@pytest.mark.parametrize("use_block_cache", [False, True])
def test_generate_computes_the_logits_of_the_block_window_only(remasking, use_block_cache, monkeypatch, tiny_model):
    """Each denoising pass computes the logits of the block being filled (from its first mask in any row), and the
    tokens are those of passes that compute every position's logits and read the same rows."""
    model = tiny_model(seed=4)
    prompt = random_ids(model, 2, 6)
    prompt[1, 2] = model.config.mask_token_id  # an infilling mask: the first block's window starts there
    kwargs = dict(max_new_tokens=12, steps=6, block_length=4, remasking=remasking, do_sample=True, seed=1,
                  use_block_cache=use_block_cache)
    windows = []  # the positions whose logits each pass computed

    def recorded(denoise):
        def call(self, sequences):
            logits = denoise(self, sequences)
            assert logits.shape[1] == len(self.positions)
            windows.append(self.positions.tolist())
            return logits
        return call

    for kind in (EagerDenoiser, BlockCacheDenoiser):
        monkeypatch.setattr(kind, "__call__", recorded(kind.__call__))
    windowed = model.generate(prompt, **kwargs)
    assert windows[0] == list(range(2, 10)) and windows[-1] == list(range(14, 18))
    assert all(len(window) <= 8 for window in windows)
    monkeypatch.undo()

    if not use_block_cache:  # (the cache is approximate: its tokens may differ from uncached passes')
        def every_position(self, sequences):
            logits = self.model(input_ids=sequences, attention_mask=self.attention_mask, return_dict=True).logits
            return logits[:, self.positions]

        monkeypatch.setattr(EagerDenoiser, "__call__", every_position)
        assert torch.equal(windowed, model.generate(prompt, **kwargs))


def test_non_binary_mask_and_float_ids_are_refused(tiny_model):
    model = tiny_model()
    ids = random_ids(model, 2, 5)
    with pytest.raises(ValueError, match="only 0 .padding. and 1"):
        model.generate(ids, attention_mask=torch.full((2, 5), 0.5), max_new_tokens=4)
    with pytest.raises(TypeError, match="integer"):
        model.generate(ids.float(), max_new_tokens=4)


def test_per_call_settings_do_not_change_the_model_config(tiny_model):
    model = tiny_model()
    before = model.generation_config.to_dict()
    model.generate(random_ids(model, 1, 4), max_new_tokens=4, steps=2, remasking="margin")
    assert model.generation_config.to_dict() == before


def test_generation_config_saves_with_the_model_and_reloads(tmp_path, tiny_model):
    model = tiny_model()
    model.generation_config.update(
        steps=8, block_length=4, remasking="margin", confidence_threshold=0.8, do_sample=True, temperature=0.7,
        top_p=0.9, max_new_tokens=16,
    )
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["remasking"] == "margin" and saved["block_length"] == 4 and saved["mask_token_id"] == 95
    for loaded in (DiffuAprielForMaskedLM.from_pretrained(tmp_path), AutoModelForMaskedLM.from_pretrained(tmp_path)):
        assert isinstance(loaded.generation_config, DiffusionGenerationConfig)
        assert loaded.generation_config == model.generation_config
        ids = random_ids(model, 1, 4)
        assert torch.equal(loaded.generate(ids, seed=5), model.generate(ids, seed=5))
    # A checkpoint without generation_config.json falls back to the one built from the model config.
    (tmp_path / "generation_config.json").unlink()
    loaded = DiffuAprielForMaskedLM.from_pretrained(tmp_path)
    assert isinstance(loaded.generation_config, DiffusionGenerationConfig)
    assert loaded.generation_config.steps is None and loaded.generation_config.mask_token_id == 95
    # A config given to from_pretrained wins, as a DiffusionGenerationConfig.
    loaded = DiffuAprielForMaskedLM.from_pretrained(tmp_path, generation_config=GenerationConfig(max_new_tokens=12))
    assert isinstance(loaded.generation_config, DiffusionGenerationConfig)
    assert loaded.generation_config.max_new_tokens == 12


# ----------------------------------------------------------------------------------------------------------------------
# The sampling math


@pytest.mark.parametrize("num_masked, steps", [(10, 4), (5, 4), (2, 4), (16, 16), (7, 1), (0, 3)])
def test_commit_schedule_spreads_the_masks_evenly(num_masked, steps):
    counts, remaining = [], torch.tensor([num_masked])
    for steps_left in range(steps, 0, -1):
        n = int(num_tokens_to_commit(remaining, torch.tensor([steps_left])))
        counts.append(n)
        remaining -= n
    # LLaDA's schedule: num_masked // steps each, the remainder one each to the first steps.
    base, extra = divmod(num_masked, steps)
    assert counts == [base + 1] * extra + [base] * (steps - extra)


def test_commit_schedule_catches_up_after_a_large_step():
    # 8 masks over 4 steps, but the first step committed 6 (threshold): the other 2 spread over the 3 steps left.
    remaining, counts = torch.tensor([2]), []
    for steps_left in (3, 2, 1):
        counts.append(int(num_tokens_to_commit(remaining, torch.tensor([steps_left]))))
        remaining -= counts[-1]
    assert counts == [1, 1, 0]


def test_sample_categorical_draws_from_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]).expand(40000, 5)
    noise = torch.empty(probs.shape).exponential_(generator=torch.Generator().manual_seed(0))
    frequencies = torch.bincount(sample_categorical(probs, noise), minlength=5).float() / probs.shape[0]
    torch.testing.assert_close(frequencies, probs[0], atol=0.01, rtol=0)
    assert frequencies[4] == 0


def test_confidence_scores():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    tokens = torch.tensor([1, 0])
    torch.testing.assert_close(confidence_scores("low_confidence", probs, tokens), torch.tensor([0.2, 0.4]))
    torch.testing.assert_close(confidence_scores("margin", probs, tokens), torch.tensor([0.5, 0.05]))
    entropy = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(confidence_scores("entropy", probs, tokens), -entropy)
    uniform = torch.tensor([0.3, 0.9])
    assert torch.equal(confidence_scores("random", probs, tokens, uniform), uniform)
    with pytest.raises(ValueError, match="remasking"):
        confidence_scores("ancestral", probs, tokens)


def test_ancestral_reveal_probability():
    assert float(ancestral_reveal_probability(torch.tensor(1.0), torch.tensor(0.0))) == 1.0
    # From t = 0.8 to s = 0.6: alpha goes 0.2 -> 0.4, so a quarter of the masks (0.2 of 0.8) is revealed.
    torch.testing.assert_close(ancestral_reveal_probability(torch.tensor(0.8), torch.tensor(0.6)), torch.tensor(0.25))


def test_select_top_and_pad_after_eos():
    scores = torch.tensor([[0.1, 0.5, float("-inf"), 0.5], [0.2, float("-inf"), float("-inf"), 0.9]])
    chosen = select_top(scores, torch.tensor([2, 3]))
    assert chosen.tolist() == [[False, True, False, True], [True, False, False, True]]  # never a -inf entry
    assert select_top(scores, torch.tensor([1, 0])).tolist() == [[False, True, False, False], [False] * 4]
    sequences = torch.tensor([[5, 2, 7, 2, 8], [2, 6, 6, 6, 6]])
    generated = torch.tensor([[False, True, True, True, True], [False, True, True, True, True]])
    assert pad_after_eos(sequences, generated, [2], 0).tolist() == [[5, 2, 0, 0, 0], [2, 6, 6, 6, 6]]


def test_one_steps_decisions():
    in_block = torch.tensor([[False, True, True, True], [True, True, False, False]])  # 3 + 2 candidates
    logits = torch.tensor([[0.0, 5.0, 0.0, 9.0], [4.0, 0.0, 0.0, 9.0], [0.0, 0.0, 3.0, 9.0], [1.0, 0.0, 0.0, 9.0],
                           [0.0, 2.0, 0.0, 9.0]])  # (K, V), the mask token (3) the most likely everywhere
    greedy = CandidateSampler(LogitsProcessorList(), LogitsProcessorList(), sampling=False)
    probs, tokens = propose_tokens(logits, 3, greedy, counts=[3, 2], generators=None)
    assert tokens.tolist() == [1, 0, 2, 0, 1] and bool((probs[:, 3] == 0).all())  # never the mask token
    remaining, steps_left = torch.tensor([3, 2]), torch.tensor([3, 1])
    commit = choose_commits("low_confidence", in_block, probs, tokens, remaining, steps_left, None, [3, 2], None)
    assert commit.tolist() == [[False, True, False, False], [True, True, False, False]]  # 1 of 3, 2 of 2 (last step)
    # p(token) per candidate: 0.99, 0.97, 0.91 (row 0), 0.58, 0.79 (row 1): the threshold takes all of row 0, row 1
    # keeps its scheduled one, its most confident.
    sure = choose_commits("low_confidence", in_block, probs, tokens, remaining, torch.tensor([3, 2]), 0.9, [3, 2],
                          None)
    assert sure.tolist() == [[False, True, True, True], [False, True, False, False]]
    generators = [torch.Generator().manual_seed(0) for _ in range(2)]
    last = choose_commits("ancestral", in_block, probs, tokens, remaining, torch.tensor([1, 1]), None, [3, 2],
                          generators)
    assert torch.equal(last, in_block)  # the last ancestral step reveals every mask


# ----------------------------------------------------------------------------------------------------------------------
# generate()


def test_semi_autoregressive_blocks_and_steps(tiny_model):
    model = tiny_model()
    ids = random_ids(model, 1, 5)
    out = model.generate(
        ids, max_new_tokens=12, block_length=4, steps=6, eos_token_id=None, return_dict_in_generate=True,
        output_history=True,
    )
    assert isinstance(out, DiffusionGenerateOutput)
    assert out.sequences.shape == (1, 17) and torch.equal(out.sequences[:, :5], ids)
    assert out.num_forward_passes == 6 and len(out.history) == 6  # 2 steps per block, 2 tokens per step
    mask_id = model.config.mask_token_id
    for step, state in enumerate(out.history):
        masked = (state[0, 5:] == mask_id).view(3, 4)  # (block, position)
        finished_blocks = (step + 1) // 2
        assert not masked[:finished_blocks].any()
        assert masked[finished_blocks:].sum() == 12 - 2 * (step + 1)
        assert masked[finished_blocks + 1 :].all()  # later blocks untouched
    assert not (out.sequences == mask_id).any()


@pytest.mark.parametrize("remasking", ["low_confidence", "margin", "entropy", "random", "ancestral"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_committed_tokens_never_change_and_the_mask_is_never_chosen(remasking, do_sample, tiny_model):
    model = tiny_model(kind="hybrid")
    # A model that predicts the mask token itself at masked positions: it must be excluded anyway. With tied
    # embeddings, the mask's own row scaled up makes its logit lead wherever the mask is the input.
    with torch.no_grad():
        model.model.embed_tokens.weight[model.config.mask_token_id] *= 5
    ids = random_ids(model, 2, 4)
    masked_input = torch.cat([ids, torch.full((2, 4), model.config.mask_token_id)], dim=1)
    assert (model(masked_input).logits[:, 4:].argmax(-1) == model.config.mask_token_id).any()
    out = model.generate(
        ids, max_new_tokens=8, block_length=4, steps=8 if remasking == "ancestral" else 4, remasking=remasking,
        do_sample=do_sample, seed=0, eos_token_id=None, return_dict_in_generate=True, output_history=True,
    )
    mask_id = model.config.mask_token_id
    previous = torch.cat([ids, torch.full((2, 8), mask_id)], dim=1)
    for state in out.history:
        committed = previous != mask_id
        assert torch.equal(state[committed], previous[committed])
        previous = state
    assert torch.equal(out.history[-1], out.sequences)
    assert not (out.sequences == mask_id).any()


def test_confidence_threshold_commits_every_sure_token_in_one_step(tiny_model):
    model = tiny_model(sharpen=60.0)
    ids = random_ids(model, 1, 6, seed=1)
    threshold, mask_id, new = 0.5, model.config.mask_token_id, 16
    plain = model.generate(ids, max_new_tokens=new, block_length=8, eos_token_id=None, return_dict_in_generate=True)
    assert plain.num_forward_passes == new  # one token per step
    out = model.generate(
        ids, max_new_tokens=new, block_length=8, confidence_threshold=threshold, eos_token_id=None,
        return_dict_in_generate=True, output_history=True,
    )
    assert out.num_forward_passes == len(out.history) < new
    history = states(torch.cat([ids, torch.full((1, new), mask_id)], dim=1), out)
    for before, after in zip(history, history[1:]):
        logits = model(before).logits[0].float()
        logits[:, mask_id] = float("-inf")
        probs = logits.softmax(-1)
        block_start = 6 + 8 * int((before[0, 6:14] != mask_id).all())
        in_block = torch.zeros(before.shape[1], dtype=torch.bool)
        in_block[block_start : block_start + 8] = True
        in_block &= before[0] == mask_id
        committed = (before[0] == mask_id) & (after[0] != mask_id)
        assert committed.sum() >= 1 and not (committed & ~in_block).any()
        sure = in_block & (probs.max(-1).values >= threshold)
        assert not (sure & ~committed).any()
        assert torch.equal(after[0][committed], probs.argmax(-1)[committed])
    # Every token sure enough: one step per block.
    fast = model.generate(
        ids, max_new_tokens=new, block_length=8, confidence_threshold=1e-6, return_dict_in_generate=True
    )
    assert fast.num_forward_passes == 2


def test_ancestral_sampler_skips_the_forward_pass_after_a_step_that_changed_nothing(tiny_model):
    model = tiny_model()
    ids = random_ids(model, 1, 4)
    out = model.generate(
        ids, max_new_tokens=8, steps=32, remasking="ancestral", do_sample=True, seed=3, eos_token_id=None,
        return_dict_in_generate=True, output_history=True,
    )
    history = states(torch.cat([ids, torch.full((1, 8), model.config.mask_token_id)], dim=1), out)
    changed = [not torch.equal(a, b) for a, b in zip(history, history[1:])]
    assert len(changed) <= 32 and not all(changed)  # it stops once every mask is revealed
    assert out.num_forward_passes == 1 + sum(changed[:-1])  # a pass at the first step and after every change
    assert not (out.sequences == model.config.mask_token_id).any()


@pytest.mark.parametrize("new_tokens", [0, 4])
def test_infilling_fills_every_mask_and_keeps_every_given_token(new_tokens, tiny_model):
    model = tiny_model(kind="hybrid")
    mask_id = model.config.mask_token_id
    ids = random_ids(model, 2, 10)
    holes = torch.zeros_like(ids, dtype=torch.bool)
    holes[0, [0, 4, 5]] = True
    holes[1, [9]] = True
    ids = ids.masked_fill(holes, mask_id)
    settings = dict(max_new_tokens=new_tokens) if new_tokens else {}
    out = model.generate(ids, do_sample=True, seed=1, eos_token_id=None, **settings)
    assert out.shape == (2, 10 + new_tokens)
    assert torch.equal(out[:, :10][~holes], ids[~holes])
    assert not (out == mask_id).any()
    # Infilling a padded batch: the same as each alone.
    prompts = [ids[0], ids[1, 3:]]
    padded, attention = left_pad(model, prompts)
    batched = model.generate(padded, attention_mask=attention, seed=4, do_sample=True, **settings)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], seed=4, do_sample=True, **settings)
        assert torch.equal(batched[row, padded.shape[1] - len(prompt) :], alone[0])


BATCH_SETTINGS = [
    dict(),
    dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, remasking="entropy"),
    dict(do_sample=True, remasking="ancestral", steps=16),
    dict(do_sample=True, remasking="random", steps=4),
    dict(confidence_threshold=0.3, remasking="margin"),
]


def settings_id(settings):
    return "-".join(f"{k}={v}" for k, v in settings.items()) or "greedy"


@pytest.mark.parametrize("kind", ["hybrid", "mamba"])
@pytest.mark.parametrize("settings", BATCH_SETTINGS, ids=settings_id)
def test_left_padded_batch_gives_what_each_prompt_gives_alone(kind, settings, tiny_model):
    model = tiny_model(kind=kind, seed=1, sharpen=8.0)
    prompts = [random_ids(model, n, seed=n) for n in (3, 9, 6)]
    prompts[1][4] = model.config.mask_token_id  # one prompt also has a hole to fill
    ids, attention = left_pad(model, prompts)
    out = model.generate(ids, attention_mask=attention, max_new_tokens=8, block_length=4, seed=11, **settings)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=8, block_length=4, seed=11, **settings)
        assert torch.equal(out[row, ids.shape[1] - len(prompt) :], alone[0])
        assert torch.equal(out[row, : ids.shape[1] - len(prompt)], ids[row, : ids.shape[1] - len(prompt)])


def test_eos_ends_a_sequence(tiny_model):
    model = tiny_model(sharpen=4.0)
    ids = random_ids(model, 1, 3, seed=2)
    settings = dict(max_new_tokens=16, block_length=4, do_sample=True, seed=7)
    free = model.generate(ids, eos_token_id=None, return_dict_in_generate=True, **settings)
    generated = free.sequences[0, 3:].tolist()
    # Call a token of the second block that appears nowhere before it "eos": the run must then be the same up to it,
    # padding after it, and skip the last two blocks.
    eos = next(t for t in generated[4:8] if t not in generated[:4] and t != model.config.pad_token_id)
    first = 3 + generated.index(eos)
    out = model.generate(ids, eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True, **settings)
    assert torch.equal(out.sequences[0, : first + 1], free.sequences[0, : first + 1])
    assert (out.sequences[0, first + 1 :] == 0).all()
    assert out.num_forward_passes == free.num_forward_passes // 2
    # In a batch, a row that ends early does not change the others.
    other = random_ids(model, 1, 3, seed=5)
    batch = model.generate(torch.cat([ids, other]), eos_token_id=eos, pad_token_id=0, **settings)
    assert torch.equal(batch[0], out.sequences[0])
    assert torch.equal(batch[1], model.generate(other, eos_token_id=eos, pad_token_id=0, **settings)[0])


def test_seed_and_generator_are_repeatable_and_leave_the_global_rng_alone(tiny_model):
    model = tiny_model()
    ids = random_ids(model, 2, 4)
    settings = dict(max_new_tokens=8, do_sample=True, remasking="random", steps=4)
    global_state = torch.random.get_rng_state()
    first = model.generate(ids, seed=1, **settings)
    assert torch.equal(torch.random.get_rng_state(), global_state)
    torch.manual_seed(1234)  # the global RNG has no say
    assert torch.equal(model.generate(ids, seed=1, **settings), first)
    assert not torch.equal(model.generate(ids, seed=2, **settings), first)
    generated = [model.generate(ids, generator=torch.Generator().manual_seed(9), **settings) for _ in range(2)]
    assert torch.equal(generated[0], generated[1])
    # One seed per row: rows of the same prompt differ; a row's seed gives what that seed gives alone.
    same = ids[:1].expand(2, 4)
    per_row = model.generate(same, seed=[1, 2], **settings)
    assert not torch.equal(per_row[0], per_row[1])
    assert torch.equal(per_row[1], model.generate(same[:1], seed=2, **settings)[0])
    per_row_generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    assert torch.equal(model.generate(same, generator=per_row_generators, **settings), per_row)
    with pytest.raises(ValueError, match="seed"):
        model.generate(ids, seed=[1, 2, 3], **settings)


def test_sampling_with_top_k_1_is_greedy_and_sampling_differs_from_greedy(tiny_model):
    model = tiny_model()
    ids = random_ids(model, 2, 4)
    greedy = model.generate(ids, max_new_tokens=8, seed=0)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=True, top_k=1, seed=0), greedy)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=True, temperature=0.0, seed=0), greedy)
    assert not torch.equal(model.generate(ids, max_new_tokens=8, do_sample=True, seed=0), greedy)


def test_lengths_from_max_length_and_a_default_bos_prompt(tiny_model):
    model = tiny_model()
    ids = random_ids(model, 2, 5)
    assert model.generate(ids, max_length=9, eos_token_id=None).shape == (2, 9)
    out = model.generate(max_new_tokens=4, eos_token_id=None)
    assert out.shape == (1, 5) and out[0, 0] == model.config.bos_token_id


def test_return_dict_matches_the_tensor_output(tiny_model):
    model = tiny_model()
    ids = random_ids(model, 1, 4)
    tensor = model.generate(ids, max_new_tokens=8, steps=4)
    out = model.generate(ids, max_new_tokens=8, steps=4, return_dict_in_generate=True)
    assert torch.equal(out.sequences, tensor) and out.num_forward_passes == 4 and out.history is None


class RecordingStreamer:
    def __init__(self):
        self.pieces, self.ended = [], False

    def put(self, tokens):
        assert not self.ended
        self.pieces.append(tokens.clone())

    def end(self):
        self.ended = True


def test_streamer_receives_the_prompt_then_each_block(tiny_model):
    model = tiny_model()
    ids = random_ids(model, 1, 5)
    ids[0, 2] = model.config.mask_token_id
    streamer = RecordingStreamer()
    out = model.generate(ids, max_new_tokens=12, block_length=4, eos_token_id=None, streamer=streamer)
    assert streamer.ended and [p.shape[1] for p in streamer.pieces] == [5, 4, 4, 4]
    assert torch.equal(torch.cat(streamer.pieces, dim=1), out)
    assert streamer.pieces[0][0, 2] != model.config.mask_token_id  # the prompt arrives with its hole filled




def test_text_streamer_prints_the_generated_text(capsys, tiny_model, word_tokenizer):
    model = tiny_model()
    tokenizer = word_tokenizer(model.config)
    ids = tokenizer("w5 w6 w7", return_tensors="pt").input_ids
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    # No eos: a random model may predict it first, which would leave no text to print.
    out = model.generate(ids, max_new_tokens=8, block_length=4, streamer=streamer, eos_token_id=None)
    printed = capsys.readouterr().out
    assert printed.strip() == tokenizer.decode(out[0, 3:], skip_special_tokens=True).strip() != ""


def test_fill_mask_pipeline(tiny_model, word_tokenizer):
    model = tiny_model(kind="hybrid")
    tokenizer = word_tokenizer(model.config)
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer)
    predictions = fill("w3 w4 [MASK] w5", top_k=3)
    logits = model(tokenizer("w3 w4 [MASK] w5", return_tensors="pt").input_ids).logits[0, 2]
    expected = logits.softmax(-1).topk(3)
    assert [p["token"] for p in predictions] == expected.indices.tolist()
    torch.testing.assert_close(torch.tensor([p["score"] for p in predictions]), expected.values)
    assert all(p["sequence"].startswith("w3 w4") for p in predictions)
    assert len(fill(["w3 [MASK]", "w7 w8 [MASK] w9"], top_k=2)) == 2


def test_fill_mask_pipeline_from_a_saved_folder(tmp_path, tiny_model, word_tokenizer):
    model = tiny_model()
    tokenizer = word_tokenizer(model.config)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    fill = pipeline("fill-mask", model=str(tmp_path))
    assert isinstance(fill.model, DiffuAprielForMaskedLM)
    assert [p["token"] for p in fill("w3 [MASK] w4", top_k=2)] == [p["token"] for p in pipeline(
        "fill-mask", model=model, tokenizer=tokenizer
    )("w3 [MASK] w4", top_k=2)]


# ----------------------------------------------------------------------------------------------------------------------
# The published samplers are the contract: LLaDA's low-confidence remasking and Fast-dLLM's threshold decoding.


def published_transfer_counts(block_mask_index, steps):
    """LLaDA's `get_num_transfer_tokens` (GSAI-ML/LLaDA, generate.py), as published."""
    mask_num = block_mask_index.sum(dim=1, keepdim=True)
    base, remainder = mask_num // steps, mask_num % steps
    counts = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        counts[i, : remainder[i]] += 1
    return counts


def published_generate(model, prompt, steps, gen_length, block_length, temperature=0.0, generator=None,
                       threshold=None):
    """LLaDA's `generate` (GSAI-ML/LLaDA generate.py, remasking='low_confidence', no classifier-free guidance) and, with
    `threshold`, Fast-dLLM's threshold decoding (NVlabs/Fast-dLLM llada/generate.py: `get_transfer_index` keeps the
    most confident candidate and every other one at least `threshold` sure, until the block is full), one prompt,
    as published but for two adaptations: the mask token's logit is -inf (our models, as MDLM's SUBS, never predict
    it), and the Gumbel noise -log(U) of every position is drawn as Exp(1) draws from `generator`, one row of the
    vocabulary per mask of the current block, left to right: the same distribution, and the draws our sampler makes.
    Returns (sequence, forward passes)."""
    mask_id = model.config.mask_token_id
    x = torch.full((1, prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt
    steps = steps // (gen_length // block_length)
    passes = 0
    for num_block in range(gen_length // block_length):
        start, end = prompt.shape[1] + num_block * block_length, prompt.shape[1] + (num_block + 1) * block_length
        num_transfer_tokens = published_transfer_counts(x[:, start:end] == mask_id, steps)
        i = 0
        while (x[:, start:end] == mask_id).any() and (threshold is not None or i < steps):
            mask_index = x == mask_id
            mask_index[:, end:] = False
            logits = model(x).logits.double()
            passes += 1
            logits[..., mask_id] = float("-inf")
            if temperature == 0:
                x0 = logits.argmax(dim=-1)
            else:
                exponential = torch.ones(logits.shape, dtype=torch.float64)
                exponential[mask_index] = torch.empty(int(mask_index.sum()), logits.shape[-1]).exponential_(
                    generator=generator).double()
                x0 = (logits.exp() / exponential**temperature).argmax(dim=-1)
            x0_p = logits.softmax(dim=-1).gather(-1, x0[..., None]).squeeze(-1)
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, float("-inf"))
            count = int(mask_index.sum()) if threshold is not None else int(num_transfer_tokens[0, i])
            _, select_index = torch.topk(confidence[0], k=count)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            transfer_index[0, select_index] = True
            if threshold is not None:
                for k in range(1, count):
                    if confidence[0, select_index[k]] < threshold:
                        transfer_index[0, select_index[k]] = False
            x[transfer_index] = x0[transfer_index]
            i += 1
    return x, passes


PUBLISHED_RUNS = [
    dict(steps=16, gen_length=16, block_length=8),
    dict(steps=8, gen_length=16, block_length=8),
    dict(steps=6, gen_length=12, block_length=4),
    dict(steps=4, gen_length=16, block_length=16),
    dict(steps=8, gen_length=16, block_length=8, temperature=1.0),
    dict(steps=8, gen_length=16, block_length=4, temperature=0.7),
    dict(steps=16, gen_length=16, block_length=8, threshold=0.5),
    dict(steps=24, gen_length=24, block_length=8, threshold=0.3),
    dict(steps=16, gen_length=16, block_length=16, threshold=0.4, temperature=1.0),
]


@pytest.mark.parametrize("run", PUBLISHED_RUNS, ids=settings_id)
@pytest.mark.parametrize("kind", ["hybrid", "mamba"])
def test_the_same_tokens_passes_and_draws_as_llada_and_fast_dllm(kind, run, tiny_model):
    """Where the lengths divide, `generate()` is LLaDA's sampler (and with a threshold and `steps` unset, Fast-dLLM's
    threshold decoding): the same tokens, the same number of forward passes, the same draws from one random stream."""
    model = tiny_model(kind=kind, seed=2, sharpen=30.0)
    prompt = random_ids(model, 1, 5, seed=3)
    expected, passes = published_generate(model, prompt, generator=torch.Generator().manual_seed(9), **run)
    temperature, threshold = run.get("temperature", 0.0), run.get("threshold")
    out = model.generate(
        prompt, max_new_tokens=run["gen_length"], block_length=run["block_length"],
        steps=None if threshold is not None else run["steps"], confidence_threshold=threshold,
        do_sample=temperature > 0, temperature=temperature or None, generator=[torch.Generator().manual_seed(9)],
        eos_token_id=None, return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, expected)
    assert out.num_forward_passes == passes
    if threshold is not None:
        assert passes < run["gen_length"]  # the threshold committed several tokens at some step


# ----------------------------------------------------------------------------------------------------------------------
# The plan, without a model


def test_plan_any_length_with_a_shorter_last_block_and_steps_spread_in_proportion():
    plan = plan_generation(5, False, 20, None, 8, 5)
    assert plan.blocks == ((5, 13), (13, 21), (21, 25)) and plan.length == 25
    assert plan.steps == (2, 2, 1) and sum(plan.steps) == 5
    assert plan_generation(5, False, 20, None, 8, None).steps is None  # one token per step
    assert plan_generation(0, False, 16, None, 8, 8).steps == (4, 4)  # lengths that divide: LLaDA's equal shares
    assert plan_generation(0, False, 12, None, 4, 7).steps == (3, 2, 2)  # the remainder to the first blocks
    assert plan_generation(0, False, 17, None, 8, 6).steps == (3, 2, 1)
    assert plan_generation(3, True, None, None, 8, 4) == GenerationPlan(3, 0, ((3, 3),), (4,))  # infilling only
    assert plan_generation(3, False, None, 10, None, None).blocks == ((3, 10),)  # from max_length
    for steps in range(3, 40):
        assert sum(plan_generation(0, False, 21, None, 8, steps).steps) == steps


@pytest.mark.parametrize(
    "call, message",
    [
        (dict(max_new_tokens=16, block_length=4, steps=3), r"`steps` \(3\) is fewer than the blocks \(4\)"),
        (dict(max_new_tokens=0), "nothing to generate"),
        (dict(max_length=4), r"`max_length` \(4\) leaves no room"),
        (dict(max_new_tokens=300, max_positions=256), "max_position_embeddings"),
    ],
)
def test_plan_refusals_name_the_setting(call, message):
    settings = dict(max_new_tokens=None, max_length=None, block_length=None, steps=None)
    settings.update(call)
    with pytest.raises(ValueError, match=message):
        plan_generation(6, False, **settings)


# ----------------------------------------------------------------------------------------------------------------------
# Generation always ends


@pytest.mark.parametrize("remasking", ["low_confidence", "random", "ancestral"])
def test_non_finite_logits_raise_naming_the_step(remasking, tiny_model):
    model = tiny_model()
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    with pytest.raises(RuntimeError, match=r"step 0 \(block 0\).*not finite"):
        model.generate(random_ids(model, 1, 4), max_new_tokens=8, steps=4, remasking=remasking, do_sample=True, seed=0)


def test_a_step_that_commits_nothing_raises_naming_the_step(monkeypatch, tiny_model):
    model = tiny_model()
    nothing = lambda *args: torch.zeros_like(args[1])  # noqa: E731  (a rule gone wrong)
    monkeypatch.setattr(generation, "choose_commits", nothing)
    with pytest.raises(RuntimeError, match=r"step 0 \(block 0\).*committed none"):
        model.generate(random_ids(model, 1, 4), max_new_tokens=8)


@pytest.mark.parametrize("settings", [dict(), dict(confidence_threshold=0.2), dict(remasking="ancestral",
                                                                                   do_sample=True)])
@pytest.mark.parametrize("steps", [3, 5, 11, None])
def test_any_length_gets_what_it_asks_in_no_more_passes_than_steps(settings, steps, tiny_model):
    model = tiny_model(sharpen=20.0)
    ids = random_ids(model, 2, 5)
    out = model.generate(ids, max_new_tokens=11, block_length=4, steps=steps, seed=3, eos_token_id=None,
                         return_dict_in_generate=True, **settings)
    assert out.sequences.shape == (2, 16) and not (out.sequences == model.config.mask_token_id).any()
    assert out.num_forward_passes <= (steps or 11)
    if steps is None and not settings:
        assert out.num_forward_passes == 11  # one token per step
    # A row takes part in the passes while it has masks: a row that finishes a block first takes part in fewer.
    assert out.tokens_per_forward.shape == (2,) and (out.tokens_per_forward >= 11 / out.num_forward_passes).all()
    if steps is None and not settings:
        assert out.tokens_per_forward.tolist() == [1.0, 1.0]


# ----------------------------------------------------------------------------------------------------------------------
# The threshold means what it says


@pytest.mark.parametrize("remasking", ["low_confidence", "margin", "entropy", "random"])
def test_threshold_commits_every_sure_candidate_whatever_the_rule(remasking):
    in_block = torch.tensor([[True, True, True, True, False]])
    probs = torch.tensor([[0.35, 0.3, 0.35], [0.9, 0.05, 0.05], [0.226, 0.7, 0.074], [0.5, 0.49, 0.01]])
    tokens = probs.argmax(-1)  # p = 0.35, 0.9, 0.7, 0.5
    generators = [torch.Generator().manual_seed(0)]
    for steps_left, committed in ((4, 3), (1, 4)):  # schedule minimum 1 (the sure ones suffice), then all 4
        commit = choose_commits(remasking, in_block, probs, tokens, torch.tensor([4]), torch.tensor([steps_left]),
                                0.5, [4], generators)
        assert commit[0, [1, 2, 3]].all() and int(commit.sum()) == committed
    # Below the threshold, the rule chooses among the others only: one sure (0.9), a minimum of two, and margin
    # prefers position 2 (0.7 - 0.226) to 3 (0.01) and 0 (0); random draws among 0, 2 and 3.
    commit = choose_commits(remasking, in_block, probs, tokens, torch.tensor([4]), torch.tensor([2]), 0.8, [4],
                            generators)
    assert commit[0, 1] and int(commit.sum()) == 2
    if remasking in ("low_confidence", "margin"):
        assert commit[0].tolist() == [False, True, True, False, False]


@pytest.mark.parametrize("remasking", ["margin", "entropy", "random"])
def test_generate_with_a_threshold_never_leaves_a_sure_mask(remasking, tiny_model):
    model = tiny_model(sharpen=30.0)
    ids = random_ids(model, 1, 6, seed=1)
    threshold, mask_id = 0.4, model.config.mask_token_id
    out = model.generate(ids, max_new_tokens=12, block_length=12, confidence_threshold=threshold,
                         remasking=remasking, do_sample=False, seed=2, eos_token_id=None,
                         return_dict_in_generate=True, output_history=True)
    history = states(torch.cat([ids, torch.full((1, 12), mask_id)], dim=1), out)
    for before, after in zip(history, history[1:]):
        logits = model(before).logits[0].float()
        logits[:, mask_id] = float("-inf")
        probs = logits.softmax(-1)
        sure = (before[0] == mask_id) & (probs.max(-1).values >= threshold)
        assert not (sure & (after[0] == mask_id)).any()


# ----------------------------------------------------------------------------------------------------------------------
# Sampling through transformers' logits processors


def filter_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """The hand-written filter that transformers' warpers replaced, kept as the reference they must match:
    temperature, then top-k, then nucleus (top-p) filtering, -inf at the removed tokens."""
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[..., -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
        remove = (mass_above >= top_p).scatter(-1, order, mass_above >= top_p)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.7, None, None), (1.0, 5, None),
                                                       (1.0, None, 0.8), (0.6, 20, 0.9), (1.3, 3, 0.5)])
def test_transformers_warpers_draw_the_tokens_of_the_old_filter(temperature, top_k, top_p):
    logits = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 3
    logits[:, 95] = float("-inf")  # the mask token
    config = DiffusionGenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    sampler = candidate_sampler(config, 0, None)
    sequences, candidates = torch.zeros(8, 8, dtype=torch.long), torch.ones(8, 8, dtype=torch.bool)
    generators = [torch.Generator().manual_seed(row) for row in range(8)]
    _, tokens = propose_tokens(logits, 95, sampler, [8] * 8, generators, sequences, candidates)
    noise = torch.cat([torch.empty(8, 96).exponential_(generator=torch.Generator().manual_seed(row))
                       for row in range(8)])
    expected = sample_categorical(filter_logits(logits, temperature, top_k, top_p).softmax(-1), noise)
    assert torch.equal(tokens, expected)


# ----------------------------------------------------------------------------------------------------------------------
# Every standard option honoured or refused by name


# A value that asks for something, for the options refused (others: True).
REFUSED_SAMPLES = {
    "num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 0.5, "length_penalty": 2.0, "penalty_alpha": 0.6,
    "cache_implementation": "static", "cache_config": {"max_cache_len": 64}, "max_cache_len": 64, "top_h": 0.5,
    "encoder_repetition_penalty": 1.2, "encoder_no_repeat_ngram_size": 2, "forced_bos_token_id": 3,
    "forced_eos_token_id": 3, "exponential_decay_length_penalty": (2, 1.1), "suppress_tokens": [3],
    "begin_suppress_tokens": [3], "sequence_bias": [[[3], 1.0]], "guidance_scale": 2.0,
    "watermarking_config": {"greenlist_ratio": 0.25}, "decoder_start_token_id": 3, "num_assistant_tokens": 5,
    "num_assistant_tokens_schedule": "heuristic", "assistant_confidence_threshold": 0.5,
    "prompt_lookup_num_tokens": 3, "max_matching_ngram_size": 2, "assistant_early_exit": 1,
    "assistant_lookbehind": 5, "target_lookbehind": 5, "assistant_ensemble_weight": 0.5, "speculation_type": "mtp",
    "compile_config": {"fullgraph": True}, "continuous_batching_config": {"block_size": 8}, "dola_layers": "low",
    "constraints": ["a constraint"], "force_words_ids": [[3]], "prefill_chunk_size": 8, "generation_kwargs": {"a": 1},
}


def standard_options():
    return sorted(name for name in vars(GenerationConfig()) if not name.startswith("_"))


@pytest.mark.parametrize("name", standard_options())
def test_every_standard_option_is_honoured_or_refused_by_name(name, tiny_model):
    """Walks the installed transformers' GenerationConfig: an option is honoured (HONOURED_OPTIONS, each with its own
    test) or refused with a ValueError that names it."""
    if name in HONOURED_OPTIONS:
        assert name in HONOURED_TESTS, f"{name} is honoured but no test says how"
        return
    model = tiny_model()
    with pytest.raises(ValueError, match=f"`{name}`"):
        model.generate(random_ids(model, 1, 4), max_new_tokens=4, **{name: REFUSED_SAMPLES.get(name, True)})


HONOURED_TESTS = {
    "max_length": "test_lengths_from_max_length_and_a_default_bos_prompt",
    "max_new_tokens": "test_semi_autoregressive_blocks_and_steps",
    "min_length": "test_min_new_tokens_and_min_length_suppress_eos_before_them",
    "min_new_tokens": "test_min_new_tokens_and_min_length_suppress_eos_before_them",
    "max_time": "test_stopping_criteria_and_stop_strings_end_a_row_after_its_block",
    "stop_strings": "test_stopping_criteria_and_stop_strings_end_a_row_after_its_block",  # and test_default_model.py
    "do_sample": "test_sampling_with_top_k_1_is_greedy_and_sampling_differs_from_greedy",
    "temperature": "test_transformers_warpers_draw_the_tokens_of_the_old_filter",
    "top_k": "test_transformers_warpers_draw_the_tokens_of_the_old_filter",
    "top_p": "test_transformers_warpers_draw_the_tokens_of_the_old_filter",
    "min_p": "test_processors_and_warpers_change_what_is_drawn",
    "typical_p": "test_processors_and_warpers_change_what_is_drawn",
    "epsilon_cutoff": "test_processors_and_warpers_change_what_is_drawn",
    "eta_cutoff": "test_processors_and_warpers_change_what_is_drawn",
    "repetition_penalty": "test_processors_and_warpers_change_what_is_drawn",
    "no_repeat_ngram_size": "test_processors_and_warpers_change_what_is_drawn",
    "bad_words_ids": "test_processors_and_warpers_change_what_is_drawn",
    "num_return_sequences": "test_num_return_sequences_gives_each_row_its_own_stream",
    "return_dict_in_generate": "test_return_dict_matches_the_tensor_output",
    "pad_token_id": "test_eos_ends_a_sequence",
    "bos_token_id": "test_lengths_from_max_length_and_a_default_bos_prompt",
    "eos_token_id": "test_eos_ends_a_sequence",
    "use_cache": "test_use_cache_changes_nothing",
    "transformers_version": "test_generation_config_saves_with_the_model_and_reloads",
}


def test_honoured_options_have_their_tests():
    assert set(HONOURED_TESTS) == HONOURED_OPTIONS - {"_from_model_config"}
    assert all(name in globals() for name in HONOURED_TESTS.values())


def test_use_cache_changes_nothing(tiny_model):
    model = tiny_model()
    ids = random_ids(model, 1, 4)
    plain = model.generate(ids, max_new_tokens=8)
    assert torch.equal(model.generate(ids, max_new_tokens=8, use_cache=False), plain)
    assert torch.equal(model.generate(ids, max_new_tokens=8, use_cache=True), plain)


@pytest.mark.parametrize(
    "settings, name",
    [
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(pad_token_id=96), "pad_token_id"),
        (dict(eos_token_id=[2, 500]), "eos_token_id"),
        (dict(eos_token_id=-1), "eos_token_id"),
    ],
)
def test_invalid_values_are_refused_by_name(settings, name, tiny_model):
    model = tiny_model()
    with pytest.raises(ValueError, match=f"`{name}`"):
        model.generate(random_ids(model, 1, 4), max_new_tokens=4, do_sample=True, **settings)


def test_processors_and_warpers_change_what_is_drawn(tiny_model):
    model = tiny_model(sharpen=5.0)
    ids = random_ids(model, 2, 6)
    settings = dict(max_new_tokens=12, block_length=4, do_sample=True, seed=3, eos_token_id=None)
    plain = model.generate(ids, **settings)
    for option in (dict(min_p=0.2), dict(typical_p=0.5), dict(epsilon_cutoff=0.05), dict(eta_cutoff=0.9),
                   dict(repetition_penalty=5.0)):
        assert not torch.equal(model.generate(ids, **option, **settings), plain), option
    banned = plain[0, 6:9].tolist()
    out = model.generate(ids, bad_words_ids=[[t] for t in banned], **settings)
    assert not torch.isin(out[:, 6:], torch.tensor(banned)).any()
    out = model.generate(ids, no_repeat_ngram_size=1, **settings)  # no token twice in a row's text
    for row in out.tolist():
        assert len(set(row[6:])) == 12 and not set(row[6:]) & set(row[:6])


def test_min_new_tokens_and_min_length_suppress_eos_before_them(tiny_model):
    model = tiny_model(sharpen=4.0)
    ids = random_ids(model, 1, 3, seed=2)
    settings = dict(max_new_tokens=16, block_length=4, do_sample=True, seed=7)
    free = model.generate(ids, eos_token_id=None, **settings)[0, 3:].tolist()
    eos = free[1]  # called "eos": it ends the row at the second token without a minimum
    early = model.generate(ids, eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True, **settings)
    assert early.sequences[0, 5:].eq(0).all()
    for minimum in (dict(min_new_tokens=10), dict(min_length=13)):
        out = model.generate(ids, eos_token_id=eos, pad_token_id=0, **minimum, **settings)[0, 3:].tolist()
        assert eos not in out[:10]


def test_logits_processor_is_applied_to_every_candidate(tiny_model):
    model = tiny_model()
    ids = random_ids(model, 2, 4)
    seen = []

    class Only7(LogitsProcessor):
        def __call__(self, input_ids, scores):
            seen.append(input_ids.shape)
            return torch.full_like(scores, float("-inf")).index_fill(-1, torch.tensor([7]), 0.0)

    out = model.generate(ids, max_new_tokens=8, logits_processor=LogitsProcessorList([Only7()]))
    assert out[:, 4:].eq(7).all()
    assert {shape[1] for shape in seen} <= set(range(4, 12))  # each candidate sees the tokens before it


def test_stopping_criteria_and_stop_strings_end_a_row_after_its_block(tiny_model):
    model = tiny_model(sharpen=4.0)
    ids = random_ids(model, 2, 3, seed=2)
    settings = dict(max_new_tokens=16, block_length=4, do_sample=True, seed=7, eos_token_id=None, pad_token_id=0)
    free = model.generate(ids, **settings)

    class AfterEight(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 3 + 8)

    out = model.generate(ids, stopping_criteria=StoppingCriteriaList([AfterEight()]), return_dict_in_generate=True,
                         **settings)
    assert torch.equal(out.sequences[:, :11], free[:, :11]) and out.sequences[:, 11:].eq(0).all()
    assert out.num_forward_passes == 8  # two blocks of four
    with pytest.raises(ValueError, match="tokenizer"):  # stop_strings: test_default_model.py, with a real tokenizer
        model.generate(ids, stop_strings=["w5"], **settings)
    timed = model.generate(ids, max_time=0.0, return_dict_in_generate=True, **settings)
    assert timed.num_forward_passes == 4 and timed.sequences[:, 7:].eq(0).all()  # ended after the first block


def test_num_return_sequences_gives_each_row_its_own_stream(tiny_model):
    model = tiny_model()
    ids = random_ids(model, 2, 4)
    settings = dict(max_new_tokens=8, do_sample=True, seed=5)
    out = model.generate(ids, num_return_sequences=3, **settings)
    assert out.shape == (6, 12) and torch.equal(out[:, :4], ids.repeat_interleave(3, dim=0))
    assert len({tuple(row) for row in out[:3].tolist()}) == 3  # the copies of a prompt differ
    assert torch.equal(out[::3], model.generate(ids, **settings))  # the first copy is the call without copies
    with pytest.raises(ValueError, match="num_return_sequences"):  # copies of a greedy run: refused, as transformers
        model.generate(ids, max_new_tokens=8, num_return_sequences=2)


class DraftStreamer(RecordingStreamer):
    def __init__(self):
        super().__init__()
        self.drafts = []

    def put_draft(self, tokens):
        self.drafts.append(tokens.clone())


def test_a_streamer_with_put_draft_sees_the_block_after_every_step(tiny_model):
    model = tiny_model()
    ids = random_ids(model, 1, 5)
    streamer = DraftStreamer()
    out = model.generate(ids, max_new_tokens=12, block_length=4, steps=6, eos_token_id=None, streamer=streamer,
                         return_dict_in_generate=True, output_history=True)
    assert len(streamer.drafts) == len(out.history) == 6 and [d.shape[1] for d in streamer.drafts] == [4] * 6
    for step, (draft, state) in enumerate(zip(streamer.drafts, out.history)):
        start = 5 + 4 * (step // 2)  # the block of the step
        assert torch.equal(draft, state[:, start : start + 4])
    mask_id = model.config.mask_token_id
    assert [int((d == mask_id).sum()) for d in streamer.drafts] == [2, 0, 2, 0, 2, 0]  # two tokens a step
    assert torch.equal(torch.cat(streamer.drafts[1::2], dim=1), out.sequences[:, 5:])
    assert torch.equal(torch.cat(streamer.pieces, dim=1), out.sequences)  # committed tokens through put, as before


def test_text_diffusion_streamer_shows_drafts(capsys, tiny_model, word_tokenizer):
    model = tiny_model()
    tokenizer = word_tokenizer(model.config)
    ids = tokenizer("w5 w6 w7", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, block_length=4, eos_token_id=None,
                         streamer=TextDiffusionStreamer(tokenizer))
    printed = capsys.readouterr().out
    assert "[MASK]" in printed and "\033" in printed  # a draft with masks, drawn over in place
    assert printed.rstrip().endswith(tokenizer.decode(out[0, 3:]).split()[-1])
