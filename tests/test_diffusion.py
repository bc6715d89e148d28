"""The masked diffusion math, the collator's noising and the ELBO evaluation, on the CPU with tiny models."""

import math

import pytest
import torch

from conftest import build_tiny_model

from diffuapriel_hf import DataCollatorForMaskedDiffusion
from diffuapriel_hf.modeling.diffusion import (
    bits_per_token, elbo_times, loss_weight, mask_probability, masked_diffusion_loss, negative_elbo, noise_tokens,
    perplexity_bound, sample_times, token_nll,
)


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyTokenizer:
    """The attributes the collator reads from a tokenizer."""

    def __init__(self, mask_token_id=95, pad_token_id=0, padding_side="right"):
        self.mask_token_id, self.pad_token_id, self.padding_side = mask_token_id, pad_token_id, padding_side


def test_sample_times_is_stratified_and_bounded():
    eps = 0.05
    generator = torch.Generator().manual_seed(0)
    for batch_size in (1, 2, 7, 64):
        for _ in range(20):
            t = sample_times(batch_size, sampling_eps=eps, generator=generator)
            assert t.shape == (batch_size,)
            assert bool((t >= eps).all()) and bool((t < 1).all())
            # Exactly one time in each of the batch's strata of [eps, 1).
            strata = ((t - eps) / (1 - eps) * batch_size).floor().long()
            assert sorted(strata.tolist()) == list(range(batch_size))
    # The shared offset is uniform: the mean over many batches is the midpoint of [eps, 1).
    means = torch.stack([sample_times(4, eps, generator) for _ in range(2000)]).mean()
    assert abs(float(means) - (1 + eps) / 2) < 0.01


def test_sample_times_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        sample_times(0)
    with pytest.raises(ValueError, match="sampling_eps"):
        sample_times(4, sampling_eps=0.0)


def test_log_linear_schedule():
    t = torch.tensor([0.001, 0.25, 0.5, 1.0])
    # alpha_t = 1 - t: the masking probability is t and the ELBO weight -alpha'_t / (1 - alpha_t) is 1/t.
    torch.testing.assert_close(mask_probability(t), t)
    torch.testing.assert_close(loss_weight(t), torch.tensor([1000.0, 4.0, 2.0, 1.0]))


def test_noise_tokens_masks_at_rate_t_and_only_noisable_tokens():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 90, (4, 20000))
    t = torch.tensor([0.05, 0.3, 0.6, 0.95])
    noisable = torch.ones_like(input_ids, dtype=torch.bool)
    noisable[:, :1000] = False
    noised, masked = noise_tokens(input_ids, t, mask_token_id=95, noisable=noisable, generator=generator)
    assert not masked[:, :1000].any()
    rates = masked[:, 1000:].float().mean(-1)
    torch.testing.assert_close(rates, t, atol=0.01, rtol=0)  # binomial sd <= 0.0036
    assert bool((noised[masked] == 95).all())
    assert torch.equal(noised[~masked], input_ids[~masked])


def test_masked_diffusion_loss_matches_hand_computation():
    vocab, mask_token_id = 5, 4
    logits = torch.tensor([[[1.0, 2.0, 0.5, -1.0, 9.0], [0.0, 0.0, 0.0, 0.0, 9.0], [3.0, 1.0, 0.0, 2.0, 9.0]],
                           [[0.2, -0.4, 1.5, 0.0, 9.0], [1.0, 1.0, 2.0, 3.0, 9.0], [0.0, 0.0, 0.0, 0.0, 0.0]]])
    labels = torch.tensor([[1, -100, 3], [-100, 2, -100]])
    # Sequence 0 has t = 0.5 and three counted tokens; sequence 1 has t = 0.25, two counted tokens, one padding.
    loss_weights = torch.tensor([[2.0, 2.0, 2.0], [4.0, 4.0, 0.0]])

    def nll(row, target):  # -log softmax over the vocabulary without the mask token
        kept = row[:mask_token_id]
        return math.log(sum(math.exp(v) for v in kept.tolist())) - float(kept[target])

    expected = (2.0 * nll(logits[0, 0], 1) + 2.0 * nll(logits[0, 2], 3) + 4.0 * nll(logits[1, 1], 2)) / 5
    loss = masked_diffusion_loss(logits, labels, loss_weights, mask_token_id)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    unweighted = masked_diffusion_loss(logits, labels, None, mask_token_id)
    assert unweighted.item() == pytest.approx((nll(logits[0, 0], 1) + nll(logits[0, 2], 3) + nll(logits[1, 1], 2)) / 3)
    assert logits.shape[-1] == vocab and token_nll(logits, labels, mask_token_id)[0, 1] == 0


def test_collator_returns_the_loss_contract():
    torch.manual_seed(0)
    collator = DataCollatorForMaskedDiffusion(TinyTokenizer(), sampling_eps=1e-3)
    examples = [{"input_ids": list(range(3, 3 + n))} for n in (40, 25, 33, 40)]
    batch = collator(examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "loss_weights"}
    assert batch["input_ids"].shape == (4, 40)
    real = batch["attention_mask"].bool()
    assert real.sum(-1).tolist() == [40, 25, 33, 40]
    masked = batch["input_ids"] == 95
    assert not (masked & ~real).any() and bool((batch["input_ids"][~real] == 0).all())
    clean = torch.zeros(4, 40, dtype=torch.long)
    for i, example in enumerate(examples):
        clean[i, : len(example["input_ids"])] = torch.tensor(example["input_ids"])
    assert torch.equal(batch["labels"], clean.masked_fill(~masked, -100))
    # One weight 1/t per sequence on its real tokens, the times stratified over the batch.
    weights = batch["loss_weights"]
    assert bool((weights[~real] == 0).all())
    t = 1 / weights[:, 0]
    assert torch.equal(weights, (1 / t)[:, None] * real)
    assert sorted(((t - 1e-3) / (1 - 1e-3) * 4).floor().long().tolist()) == [0, 1, 2, 3]


def test_collator_masking_rate_matches_t():
    torch.manual_seed(0)
    collator = DataCollatorForMaskedDiffusion(TinyTokenizer())
    masked, expected = 0.0, 0.0
    for _ in range(50):
        batch = collator([{"input_ids": [5] * 400} for _ in range(8)])
        t = 1 / batch["loss_weights"][:, 0]
        masked += float((batch["labels"] != -100).sum())
        expected += float(t.sum()) * 400
    assert masked / expected == pytest.approx(1.0, abs=0.02)


def test_collator_never_masks_an_sft_prompt_and_pads_left():
    torch.manual_seed(0)
    collator = DataCollatorForMaskedDiffusion(TinyTokenizer(padding_side="left"))
    prompt, answer = [7] * 10, [8] * 6
    examples = [{"input_ids": prompt + answer, "labels": [-100] * 10 + answer},
                {"input_ids": prompt[:4] + answer, "labels": [-100] * 4 + answer}]
    for _ in range(200):
        batch = collator(examples)
        ids, weights = batch["input_ids"], batch["loss_weights"]
        assert torch.equal(ids[0, :10], torch.tensor(prompt))
        assert torch.equal(ids[1, 6:10], torch.tensor(prompt[:4])) and bool((ids[1, :6] == 0).all())
        assert batch["attention_mask"][1].tolist() == [0] * 6 + [1] * 10
        prompt_or_pad = torch.zeros(2, 16, dtype=torch.bool)
        prompt_or_pad[:, :10] = True
        assert bool((weights[prompt_or_pad] == 0).all()) and bool((weights[~prompt_or_pad] > 0).all())
        assert bool((batch["labels"][prompt_or_pad] == -100).all())


def test_collator_fixed_time_and_seed_repeat():
    collator = DataCollatorForMaskedDiffusion(TinyTokenizer())
    examples = [{"input_ids": list(range(1, 60)), "t": 0.5, "noise_seed": 3},
                {"input_ids": list(range(1, 60)), "t": 0.2, "noise_seed": 4}]
    first, second = collator(examples), collator(examples)
    for key in first:
        assert torch.equal(first[key], second[key])
    torch.testing.assert_close(first["loss_weights"][:, 0], torch.tensor([2.0, 5.0]))


def test_collator_requires_mask_and_pad_tokens():
    with pytest.raises(ValueError, match="mask token"):
        DataCollatorForMaskedDiffusion(TinyTokenizer(mask_token_id=None))
    with pytest.raises(ValueError, match="pad token"):
        DataCollatorForMaskedDiffusion(TinyTokenizer(pad_token_id=None))


def test_compute_elbo_is_repeatable_and_leaves_the_global_rng_alone(tiny_model):
    model = tiny_model()
    input_ids = torch.randint(3, 95, (3, 24))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 18:] = 0
    state = torch.get_rng_state()
    model.train()
    first = model.compute_elbo(input_ids, attention_mask, num_samples=4, seed=7)
    second = model.compute_elbo(input_ids, attention_mask, num_samples=4, seed=7)
    assert model.training  # put back in the mode it was in
    assert torch.equal(torch.get_rng_state(), state)
    assert first.shape == (3,) and torch.equal(first, second)
    assert not torch.equal(first, model.compute_elbo(input_ids, attention_mask, num_samples=4, seed=8))


class UniformModel(torch.nn.Module):
    """Equal logits for every token: -log p = log(V - 1) at each masked position, the mask token excluded."""

    def __init__(self, vocab_size, mask_token_id):
        super().__init__()
        self.config = type("Config", (), {"mask_token_id": mask_token_id})()
        self.vocab_size = vocab_size

    def forward(self, input_ids, attention_mask=None):
        return type("Output", (), {"logits": torch.zeros(*input_ids.shape, self.vocab_size)})()


def test_negative_elbo_of_a_uniform_model_is_length_times_log_vocab():
    vocab = 33
    input_ids = torch.randint(0, 32, (2, 4000))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 3000:] = 0
    nelbo = negative_elbo(UniformModel(vocab, mask_token_id=32), input_ids, attention_mask, num_samples=16)
    # The grid estimate of E_t[(1/t) * (masked count) * log(V - 1)] = L * log(V - 1), to within sampling noise.
    expected = torch.tensor([4000.0, 3000.0]) * math.log(vocab - 1)
    torch.testing.assert_close(nelbo, expected, rtol=0.03, atol=0)
    assert bits_per_token(nelbo, attention_mask.sum()) == pytest.approx(math.log2(vocab - 1), rel=0.03)
    assert perplexity_bound(nelbo, attention_mask.sum()) == pytest.approx(vocab - 1, rel=0.1)


def test_elbo_times_and_bits_per_token():
    torch.testing.assert_close(elbo_times(4), torch.tensor([0.125, 0.375, 0.625, 0.875]))
    with pytest.raises(ValueError, match="num_samples"):
        elbo_times(0)
    assert bits_per_token(torch.tensor([math.log(2) * 10, math.log(2) * 6]), 8) == pytest.approx(2.0)
    assert perplexity_bound(math.log(3) * 5, 5) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="num_tokens"):
        bits_per_token(1.0, 0)


def test_mask_token_id_zero_gives_finite_loss_elbo_and_metrics(tiny_model):
    from diffuapriel_hf import ELBOEvaluationSet

    model = tiny_model(mask_token_id=0, pad_token_id=3)
    collator = DataCollatorForMaskedDiffusion(TinyTokenizer(mask_token_id=0, pad_token_id=3))
    batch = collator([{"input_ids": list(range(4, 40))}, {"input_ids": list(range(5, 30))}])
    assert bool((batch["labels"] == -100).any())  # positions whose placeholder target would be the mask token
    output = model(**batch)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    expected = (token_nll(output.logits, batch["labels"], 0) * batch["loss_weights"]).sum() / (36 + 25)
    torch.testing.assert_close(output.loss, expected)
    evaluation = collator(list(ELBOEvaluationSet([list(range(4, 40))], mask_token_id=0, num_samples=2)))
    assert torch.isfinite(model(**evaluation).loss)
    assert torch.isfinite(model.compute_elbo(torch.randint(1, 95, (2, 16)), num_samples=2)).all()


def test_collator_refuses_labels_or_attention_mask_of_another_length():
    collator = DataCollatorForMaskedDiffusion(TinyTokenizer())
    with pytest.raises(ValueError, match="example 1 has 3 labels for 4 input_ids"):
        collator([{"input_ids": [5, 6, 7, 8]}, {"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7]}])
    with pytest.raises(ValueError, match="example 0 has 5 attention_mask for 4 input_ids"):
        collator([{"input_ids": [5, 6, 7, 8], "attention_mask": [1] * 5}])


def test_seeded_examples_make_the_noise_a_function_of_the_examples():
    from diffuapriel_hf.training.data import NoiseSeededDataset

    dataset = NoiseSeededDataset([{"input_ids": list(range(3, 3 + n))} for n in (30, 40, 50, 60)], seed=5)
    collator = DataCollatorForMaskedDiffusion(TinyTokenizer())
    epoch0 = [dataset[i] for i in range(4)]
    torch.manual_seed(1)
    first = collator(epoch0[:2])
    torch.manual_seed(2)  # the global RNG plays no part
    second = collator([dataset[0], dataset[1]])
    for key in first:
        assert torch.equal(first[key], second[key])
    dataset.set_epoch(1)
    assert [example["noise_seed"] for example in epoch0] != [dataset[i]["noise_seed"] for i in range(4)]
    assert len({example["noise_seed"] for example in epoch0}) == 4
    # The times are still stratified over the batch.
    t = 1 / collator(epoch0)["loss_weights"][:, 0]
    assert sorted(((t - 1e-3) / (1 - 1e-3) * 4).floor().long().tolist()) == [0, 1, 2, 3]


def test_the_collator_leaves_out_a_mask_of_ones_and_the_loss_is_the_same():
    # On CUDA the model cannot tell a mask of ones from padding without waiting for the device: unpadded batches carry
    # none, and the loss is that of the batch with a mask of ones.
    collator = DataCollatorForMaskedDiffusion(TinyTokenizer(), sampling_eps=1e-3)
    examples = [{"input_ids": list(range(3, 19)), "noise_seed": i} for i in range(3)]
    batch = collator(examples)
    assert set(batch) == {"input_ids", "labels", "loss_weights"}
    noised = collator([{**examples[0], "labels": batch["labels"][0].tolist(),
                        "loss_weights": batch["loss_weights"][0].tolist()}])
    assert "attention_mask" not in noised
    padded = collator(examples + [{"input_ids": list(range(3, 10)), "noise_seed": 3}])
    assert padded["attention_mask"].sum().item() == 3 * 16 + 7
    model = build_tiny_model("hybrid", 2)
    with torch.no_grad():
        loss = model(**batch).loss
        with_mask = model(**batch, attention_mask=torch.ones_like(batch["input_ids"])).loss
    torch.testing.assert_close(loss, with_mask)
