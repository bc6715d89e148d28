"""The conditional likelihood (modeling/likelihood.py): the negative ELBO of a continuation given a prompt that is never
noised, its three estimators, batches against rows alone, block models, and the greedy check."""

import itertools
import math

import pytest
import torch

from diffuapriel_hf.modeling.diffusion import token_nll
from diffuapriel_hf.modeling.likelihood import ESTIMATORS, conditional_negative_elbo, greedy_reproduces, row_masks

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = 4


def random_ids(config, batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, config.mask_token_id, (batch, length), generator=torch.Generator().manual_seed(seed))


def padded_batch(rows, prompt_lengths, pad_id: int, side: str = "right"):
    """(input_ids, prompt_mask, attention_mask) of rows of different lengths, padded on `side`."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id)
    prompt_mask = torch.zeros(len(rows), width, dtype=torch.bool)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (row, prompt_length) in enumerate(zip(rows, prompt_lengths)):
        start = 0 if side == "right" else width - len(row)
        input_ids[i, start : start + len(row)] = row
        prompt_mask[i, start : start + prompt_length] = True
        attention_mask[i, start : start + len(row)] = 1
    return input_ids, prompt_mask, attention_mask


@pytest.mark.parametrize("block_size", [None, BLOCK])
def test_with_no_prompt_the_time_grid_is_compute_elbo_of_the_row_alone(tiny_model, block_size):
    model = tiny_model("hybrid", block_size=block_size, attn_implementation="eager")
    ids = random_ids(model.config, 3, 11, seed=1)
    input_ids, prompt_mask, attention_mask = padded_batch([ids[0], ids[1, :7], ids[2, :9]], [0, 0, 0], pad_id=1)
    nelbo = model.compute_conditional_elbo(input_ids, prompt_mask, attention_mask, num_samples=4, seed=3,
                                           estimator="time_grid")
    alone = torch.cat([model.compute_elbo(ids[0:1], num_samples=4, seed=3), model.compute_elbo(ids[1:2, :7],
                       num_samples=4, seed=3), model.compute_elbo(ids[2:3, :9], num_samples=4, seed=3)])
    torch.testing.assert_close(nelbo.nats, alone, rtol=1e-5, atol=1e-4)
    assert nelbo.num_tokens.tolist() == [11, 7, 9]
    torch.testing.assert_close(nelbo.bits, nelbo.nats / math.log(2))


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_a_padded_batch_scores_each_row_as_it_scores_alone(tiny_model, stack, estimator, side):
    model = tiny_model(stack)
    ids = random_ids(model.config, 3, 14, seed=2)
    rows, prompt_lengths = [ids[0], ids[1, :6], ids[2, :10]], [5, 1, 9]
    batch = padded_batch(rows, prompt_lengths, pad_id=1, side=side)
    nelbo = conditional_negative_elbo(model, *batch, num_samples=5, seed=11, estimator=estimator)
    for i, (row, prompt_length) in enumerate(zip(rows, prompt_lengths)):
        alone = conditional_negative_elbo(model, *padded_batch([row], [prompt_length], pad_id=1), num_samples=5,
                                          seed=11, estimator=estimator)
        torch.testing.assert_close(nelbo.nats[i : i + 1], alone.nats, rtol=1e-5, atol=1e-4)
        assert int(nelbo.num_tokens[i]) == len(row) - prompt_length


def test_a_block_models_padded_batch_scores_each_row_as_alone(tiny_model):
    model = tiny_model("hybrid", block_size=BLOCK, attn_implementation="eager")
    ids = random_ids(model.config, 2, 13, seed=3)
    rows, prompt_lengths = [ids[0], ids[1, :7]], [6, 2]
    nelbo = conditional_negative_elbo(model, *padded_batch(rows, prompt_lengths, pad_id=1), num_samples=3, seed=5)
    for i, (row, prompt_length) in enumerate(zip(rows, prompt_lengths)):
        alone = conditional_negative_elbo(model, *padded_batch([row], [prompt_length], pad_id=1), num_samples=3,
                                          seed=5)
        torch.testing.assert_close(nelbo.nats[i : i + 1], alone.nats, rtol=1e-5, atol=1e-4)


class RecordingModel(torch.nn.Module):
    """Equal logits for every token (-log p = log(V - 1) at each masked position, the mask token excluded), and a
    record of every input it was given."""

    def __init__(self, vocab_size=33, mask_token_id=32, block_size=None):
        super().__init__()
        self.config = type("Config", (), dict(mask_token_id=mask_token_id, block_size=block_size, sampling_eps=1e-3))()
        self.vocab_size, self.inputs = vocab_size, []

    def forward(self, input_ids, attention_mask=None, labels=None):
        self.inputs.append(input_ids)
        return type("Output", (), {"logits": torch.zeros(*input_ids.shape, self.vocab_size)})()


def test_the_prompt_and_padding_are_never_masked_and_the_weights_integrate_to_the_bound():
    model = RecordingModel()
    input_ids = torch.randint(0, 32, (2, 60), generator=torch.Generator().manual_seed(0))
    prompt_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    prompt_mask[0, :20], prompt_mask[1, :30] = True, True
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 50:] = 0
    expected = torch.tensor([40.0, 20.0]) * math.log(32)  # each scored token costs log(V - 1) whenever masked
    for estimator in ESTIMATORS:
        model.inputs.clear()
        nelbo = conditional_negative_elbo(model, input_ids, prompt_mask, attention_mask, num_samples=64,
                                          estimator=estimator)
        masked = torch.stack(model.inputs) == 32  # (K, B, L)
        assert not masked[:, prompt_mask].any() and not masked[:, attention_mask == 0].any()
        assert masked[:, 0].any() and masked[:, 1].any()
        # The count estimator is exact here (n / m for each of m masked tokens); the time estimators are close.
        tolerance = 1e-5 if estimator == "count_stratified" else 0.1
        torch.testing.assert_close(nelbo.nats, expected, rtol=tolerance, atol=0)


def test_row_masks_count_stratified_covers_every_count_and_weighs_n_over_m():
    scored = torch.tensor([False, True, True, True, True, False, True, True])  # six scored tokens
    masked, weights = row_masks(scored, num_samples=12, seed=0, estimator="count_stratified")
    counts = masked.sum(-1)
    assert sorted(counts.tolist()) == sorted([1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6])  # two samples in each stratum
    assert not masked[:, ~scored].any()
    torch.testing.assert_close(weights.sum(-1) / counts, 6.0 / counts.float())
    torch.testing.assert_close(weights[masked], (6.0 / counts.float())[:, None].expand_as(masked)[masked])


def test_one_scored_token_is_scored_exactly_by_the_count_estimator(tiny_model):
    model = tiny_model("hybrid")
    ids = random_ids(model.config, 1, 9, seed=4)
    prompt_mask = torch.ones_like(ids, dtype=torch.bool)
    prompt_mask[0, 5] = False
    nelbo = model.compute_conditional_elbo(ids, prompt_mask, num_samples=1)
    masked = ids.clone()
    masked[0, 5] = model.config.mask_token_id
    with torch.no_grad():
        expected = token_nll(model(masked).logits, ids.masked_fill(prompt_mask, -100), model.config.mask_token_id)
    torch.testing.assert_close(nelbo.nats, expected.sum(-1), rtol=1e-5, atol=1e-5)


def test_on_a_block_model_each_block_is_scored_beside_the_clean_blocks_before_it(tiny_model):
    model = tiny_model("hybrid", block_size=1, attn_implementation="eager")  # a block a token: each block's term exact
    mask_id = model.config.mask_token_id
    ids = random_ids(model.config, 1, 8, seed=5)
    prompt_mask = torch.zeros_like(ids, dtype=torch.bool)
    prompt_mask[0, :5] = True
    nelbo = model.compute_conditional_elbo(ids, prompt_mask, num_samples=2)
    expected = 0.0
    with torch.no_grad():
        for position in (5, 6, 7):  # -log p(x_i | the clean tokens before it), the earlier scored tokens clean too
            masked = ids.clone()
            masked[0, position] = mask_id
            labels = torch.full_like(ids, -100)
            labels[0, position] = ids[0, position]
            expected += float(token_nll(model(masked).logits, labels, mask_id).sum())
    assert float(nelbo.nats) == pytest.approx(expected, rel=1e-5)


def exact_negative_elbo(model, ids, scored_positions) -> float:
    """The bound by enumeration: sum over m of (1/m) times the mean over the m-subsets S of the scored tokens of
    sum_{i in S} -log p(x_i | x with S masked)."""
    mask_id, total = model.config.mask_token_id, 0.0
    with torch.no_grad():
        for count in range(1, len(scored_positions) + 1):
            subsets = list(itertools.combinations(scored_positions, count))
            for subset in subsets:
                masked, labels = ids.clone(), torch.full_like(ids, -100)
                masked[0, list(subset)], labels[0, list(subset)] = mask_id, ids[0, list(subset)]
                total += float(token_nll(model(masked).logits, labels, mask_id).sum()) / len(subsets) / count
    return total


def test_the_count_estimator_converges_to_the_bound_computed_by_enumeration(tiny_model):
    model = tiny_model("mamba", sharpen=4.0)
    ids = random_ids(model.config, 1, 10, seed=6)
    prompt_mask = torch.zeros_like(ids, dtype=torch.bool)
    prompt_mask[0, :6] = True
    exact = exact_negative_elbo(model, ids, [6, 7, 8, 9])
    for seed in range(3):
        estimate = model.compute_conditional_elbo(ids, prompt_mask, num_samples=64, seed=seed)
        assert float(estimate.nats) == pytest.approx(exact, rel=0.01)


def test_conditional_elbo_is_repeatable_and_leaves_the_global_rng_and_mode_alone(tiny_model):
    model = tiny_model()
    ids = random_ids(model.config, 2, 10, seed=7)
    prompt_mask = torch.zeros_like(ids, dtype=torch.bool)
    prompt_mask[:, :3] = True
    model.train()
    state = torch.get_rng_state()
    first = model.compute_conditional_elbo(ids, prompt_mask, num_samples=3, seed=1)
    assert torch.equal(first.nats, model.compute_conditional_elbo(ids, prompt_mask, num_samples=3, seed=1).nats)
    assert not torch.equal(first.nats, model.compute_conditional_elbo(ids, prompt_mask, num_samples=3, seed=2).nats)
    assert model.training and torch.equal(torch.get_rng_state(), state)
    model.eval()


def test_bad_arguments_are_refused_by_name(tiny_model):
    model = tiny_model()
    ids = random_ids(model.config, 2, 8, seed=8)
    prompt_mask = torch.zeros_like(ids, dtype=torch.bool)
    with pytest.raises(ValueError, match="prompt_mask"):
        model.compute_conditional_elbo(ids, prompt_mask[:, :4])
    with pytest.raises(ValueError, match="attention_mask"):
        model.compute_conditional_elbo(ids, prompt_mask, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="estimator"):
        model.compute_conditional_elbo(ids, prompt_mask, estimator="grid")
    with pytest.raises(ValueError, match="num_samples"):
        model.compute_conditional_elbo(ids, prompt_mask, num_samples=0)
    block_model = tiny_model(block_size=BLOCK)
    left_padded = torch.ones_like(ids)
    left_padded[0, :2] = 0
    with pytest.raises(ValueError, match="padded at their end"):
        block_model.compute_conditional_elbo(ids, prompt_mask, attention_mask=left_padded)
    context_after = prompt_mask.clone()
    context_after[:, 6:] = True
    with pytest.raises(ValueError, match="no prompt token may lie in a block after"):
        block_model.compute_conditional_elbo(ids, context_after)


@pytest.mark.parametrize("block_size", [None, BLOCK])
def test_greedy_reproduces_what_greedy_generation_writes(tiny_model, block_size):
    model = tiny_model("mamba", sharpen=8.0, block_size=block_size)
    prompt = random_ids(model.config, 1, 8, seed=9)
    new = 2 * BLOCK
    generated = model.generate(prompt, max_new_tokens=new, steps=new, block_length=block_size or new,
                               eos_token_id=None)
    prompt_mask = torch.zeros_like(generated, dtype=torch.bool)
    prompt_mask[:, : prompt.shape[1]] = True
    changed = generated.clone()
    changed[0, -3] = 3 if changed[0, -3] != 3 else 4
    both = torch.cat([generated, changed])
    assert greedy_reproduces(model, both, torch.cat([prompt_mask, prompt_mask])).tolist() == [True, False]
