"""The negative ELBO during `Trainer` evaluation: `ELBOEvaluationSet` (noised beforehand, so the same weights always give
the same `eval_loss`) and `ELBOMetricsCallback` (bits per token, perplexity bound), with default TrainingArguments."""

import math

import pytest
import torch
from transformers import Trainer, TrainingArguments

from diffuapriel_hf import DataCollatorForMaskedDiffusion, ELBOEvaluationSet, ELBOMetricsCallback

pytestmark = pytest.mark.usefixtures("one_thread")


def held_out(config, count=5, length=12, seed=0):
    ids = torch.randint(3, config.mask_token_id, (count, length), generator=torch.Generator().manual_seed(seed))
    return ids.tolist()


def default_trainer(model, tokenizer, eval_dataset, tmp_path, callbacks=(ELBOMetricsCallback(),)):
    """A Trainer with TrainingArguments at their defaults (but for the output folder, the CPU and no logging
    integrations, which only say where things go)."""
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_eval_batch_size=3)
    return Trainer(model=model, args=args, eval_dataset=eval_dataset, callbacks=list(callbacks),
                   data_collator=DataCollatorForMaskedDiffusion(tokenizer))


@pytest.mark.parametrize("block_size", [None, 4])
def test_two_evaluations_agree_and_give_the_negative_elbo_per_token(tiny_model, word_tokenizer, tmp_path,
                                                                     block_size):
    model = tiny_model("hybrid", block_size=block_size, attn_implementation="eager")
    tokenizer = word_tokenizer(model.config)
    sequences = held_out(model.config)
    trainer = default_trainer(model, tokenizer, ELBOEvaluationSet(sequences, tokenizer.mask_token_id, num_samples=3,
                                                                  seed=10), tmp_path)
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first["eval_loss"] == second["eval_loss"]
    # Each sequence's examples are the times and masks compute_elbo draws for it alone (seed 10 + i).
    nats = sum(float(model.compute_elbo(torch.tensor([ids]), num_samples=3, seed=10 + i))
               for i, ids in enumerate(sequences))
    assert first["eval_loss"] == pytest.approx(nats / (5 * 12), rel=1e-5)
    assert first["eval_bits_per_token"] == pytest.approx(first["eval_loss"] / math.log(2))
    assert first["eval_perplexity_bound"] == pytest.approx(math.exp(first["eval_loss"]))
    logged = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert logged[-1]["eval_bits_per_token"] == first["eval_bits_per_token"]


def test_without_the_set_the_collator_draws_new_noise_each_evaluation(tiny_model, word_tokenizer, tmp_path):
    model = tiny_model()
    tokenizer = word_tokenizer(model.config)
    plain = [{"input_ids": ids} for ids in held_out(model.config)]
    trainer = default_trainer(model, tokenizer, plain, tmp_path)
    assert trainer.evaluate()["eval_loss"] != trainer.evaluate()["eval_loss"]


def test_the_collator_pads_noised_examples_and_draws_nothing(word_tokenizer, tiny_model):
    model = tiny_model()
    tokenizer = word_tokenizer(model.config)
    examples = ELBOEvaluationSet(held_out(model.config, count=2, length=6), tokenizer.mask_token_id, num_samples=2)
    collator = DataCollatorForMaskedDiffusion(tokenizer)
    state = torch.get_rng_state()
    batch = collator([examples[0], examples[3]])
    assert torch.equal(torch.get_rng_state(), state)
    assert batch["input_ids"].tolist() == [examples[0]["input_ids"], examples[3]["input_ids"]]
    expected_weights = torch.tensor([examples[0]["loss_weights"], examples[3]["loss_weights"]])
    torch.testing.assert_close(batch["loss_weights"], expected_weights)
    with pytest.raises(ValueError, match="noised beforehand"):
        collator([examples[0], {"input_ids": [5, 6, 7]}])


def test_the_set_needs_sequences_of_one_length():
    with pytest.raises(ValueError, match="one length"):
        ELBOEvaluationSet([[5, 6, 7], [5, 6]], mask_token_id=95)
    with pytest.raises(ValueError, match="one length"):
        ELBOEvaluationSet([], mask_token_id=95)


def test_packed_noised_examples_give_the_padded_batchs_loss(tiny_model, word_tokenizer):
    model = tiny_model("hybrid")
    tokenizer = word_tokenizer(model.config)
    examples = list(ELBOEvaluationSet(held_out(model.config, count=3, length=8), tokenizer.mask_token_id,
                                      num_samples=2))
    with torch.no_grad():
        padded = model(**DataCollatorForMaskedDiffusion(tokenizer)(examples)).loss
        packed = model(**DataCollatorForMaskedDiffusion(tokenizer, padding_free=True)(examples)).loss
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)
