"""The training loss from the labelled positions' logits alone (`skip_logits`): the same loss and gradients as from the
logits of every position, for each stack, a block model, padded, packed and SFT batches, with and without loss
weights; which calls skip the logits by default."""

import pytest
import torch

from diffuapriel_hf import DataCollatorForMaskedDiffusion
from diffuapriel_hf.modeling import loss_triton
from diffuapriel_hf.modeling.diffusion import labelled_positions, masked_diffusion_loss, token_nll
from diffuapriel_hf.modeling.kernel_policy import override_kernel_policy

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyTokenizer:
    """The attributes the collator reads from a tokenizer (the tiny preset's ids)."""

    mask_token_id, pad_token_id, padding_side = 95, 0, "right"


def batch_of(block_size=None, padding_free=False):
    """Three examples of different lengths, one with a prompt that is never noised, noised with fixed seeds."""
    examples = [
        {"input_ids": list(range(3, 40)), "noise_seed": 1},
        {"input_ids": list(range(10, 30)), "noise_seed": 2, "labels": [-100] * 6 + list(range(16, 30))},
        {"input_ids": list(range(50, 83)), "noise_seed": 3},
    ]
    collator = DataCollatorForMaskedDiffusion(TinyTokenizer(), block_size=block_size, padding_free=padding_free)
    return collator(examples)


def loss_and_gradients(model, batch, **options):
    model.zero_grad(set_to_none=True)
    output = model(**batch, **options)
    output.loss.backward()
    return output, {name: parameter.grad.clone() for name, parameter in model.named_parameters()
                    if parameter.grad is not None}


@pytest.mark.parametrize("case", ["mamba", "hybrid", "attention", "block", "packed", "unweighted"])
def test_loss_and_gradients_equal_those_of_every_positions_logits(tiny_model, case):
    kind = case if case in ("mamba", "hybrid", "attention") else "hybrid"
    model = tiny_model(kind, **({"block_size": 8} if case == "block" else {})).train()
    batch = batch_of(block_size=8 if case == "block" else None, padding_free=case == "packed")
    if case == "unweighted":
        del batch["loss_weights"]
    labelled, labelled_grads = loss_and_gradients(model, batch)
    full, full_grads = loss_and_gradients(model, batch, skip_logits=False)
    assert labelled.logits is None and full.logits.shape == (*batch["labels"].shape, model.config.vocab_size)
    torch.testing.assert_close(labelled.loss, full.loss, rtol=1e-5, atol=1e-5)
    assert labelled_grads.keys() == full_grads.keys() and len(full_grads) == len(list(model.parameters()))
    for name, gradient in full_grads.items():
        torch.testing.assert_close(labelled_grads[name], gradient, rtol=1e-5, atol=1e-5, msg=name)


def test_logits_are_skipped_only_in_a_training_step_unless_asked(tiny_model):
    model = tiny_model("hybrid")
    batch = batch_of()
    assert model(**batch).logits is not None  # eval mode: Trainer's evaluation reads the logits
    model.train()
    assert model(**batch).logits is None and torch.isfinite(model(**batch).loss)
    with torch.no_grad():
        assert model(**batch).logits is not None
    assert model(input_ids=batch["input_ids"]).logits is not None  # no labels, no loss
    assert model.eval()(**batch, skip_logits=True).logits is None
    with pytest.raises(ValueError, match="skip_logits=True .* needs labels"):
        model(input_ids=batch["input_ids"], skip_logits=True)


def test_labelled_logits_must_be_one_row_per_labelled_position():
    labels = torch.tensor([[-100, 4, -100, 7]])
    positions = labelled_positions(labels, (1, 4))
    assert [p.tolist() for p in positions] == [[0, 0], [1, 3]]
    with pytest.raises(ValueError, match="one row for each of the 2 labelled positions"):
        masked_diffusion_loss(torch.zeros(3, 10), labels, None, 9, positions)
    with pytest.raises(ValueError, match=r"labels must have shape \(1, 5\)"):
        labelled_positions(labels, (1, 5))


@pytest.mark.parametrize("skip_logits", [True, False])
def test_the_loss_takes_its_token_nll_from_the_kernel_policy(tiny_model, skip_logits):
    """`KernelPolicy.token_nll` computes the loss's -log p(label) on both paths; `loss_triton.token_nll`, the kernels'
    candidate, is the reference itself on the CPU."""
    model, batch = tiny_model("mamba").train(), batch_of()
    expected, expected_grads = loss_and_gradients(model, batch, skip_logits=skip_logits)
    calls = []

    def recorded(logits, labels, mask_token_id):
        calls.append(logits.shape)
        return loss_triton.token_nll(logits, labels, mask_token_id)

    with override_kernel_policy(token_nll=recorded):
        got, grads = loss_and_gradients(model, batch, skip_logits=skip_logits)
    labelled = int((batch["labels"] != -100).sum())
    assert calls == [(labelled, model.config.vocab_size) if skip_logits else batch["input_ids"].shape
                     + (model.config.vocab_size,)]
    assert torch.equal(got.loss, expected.loss)
    assert all(torch.equal(grads[name], expected_grads[name]) for name in expected_grads)
    logits, labels = torch.randn(4, 9), torch.tensor([1, -100, 8, 0])
    assert torch.equal(loss_triton.token_nll(logits, labels, 3), token_nll(logits, labels, 3))
