"""Padding-free packed rows: several documents in one row (`seq_idx`, `position_ids` restarting at each) give each
document what it gives alone, in the SSD and convolution references, the model's logits, loss and gradients."""

import pytest
import torch

from diffuapriel_hf.modeling.mamba_ops import causal_conv1d_reference, mamba_chunk_scan_combined_reference

pytestmark = pytest.mark.usefixtures("one_thread")

DOCUMENTS = [5, 11, 1, 7]  # lengths: boundaries inside chunks of 4, at a chunk's end, a one-token document


def document_index(lengths, batch: int = 1) -> torch.Tensor:
    return torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)]).expand(batch, -1).int()


def test_ssd_and_convolution_restart_at_every_document():
    generator = torch.Generator().manual_seed(0)
    total, (h, p, g, n) = sum(DOCUMENTS), (4, 3, 2, 5)
    x, z = torch.randn(2, total, h, p, generator=generator), torch.randn(2, total, h, p, generator=generator)
    dt = torch.rand(2, total, h, generator=generator)
    B, C = torch.randn(2, total, g, n, generator=generator), torch.randn(2, total, g, n, generator=generator)
    A, D = -torch.rand(h, generator=generator) - 0.5, torch.randn(h, generator=generator)
    initial = torch.randn(2, h, p, n, generator=generator)
    seq_idx = document_index(DOCUMENTS, 2)
    y, final = mamba_chunk_scan_combined_reference(x, dt, A, B, C, 4, D=D, z=z, initial_states=initial,
                                                   seq_idx=seq_idx, return_final_states=True)
    conv_in = torch.randn(2, 6, total, generator=generator)
    weight, bias = torch.randn(6, 4, generator=generator), torch.randn(6, generator=generator)
    conv = causal_conv1d_reference(conv_in, weight, bias, seq_idx, activation="silu")
    start = 0
    for index, length in enumerate(DOCUMENTS):
        part = slice(start, start + length)
        alone, alone_final = mamba_chunk_scan_combined_reference(
            x[:, part], dt[:, part], A, B[:, part], C[:, part], 4, D=D, z=z[:, part],
            initial_states=initial if index == 0 else None, return_final_states=True)
        torch.testing.assert_close(y[:, part], alone, rtol=0, atol=1e-5)
        torch.testing.assert_close(conv[..., part], causal_conv1d_reference(conv_in[..., part], weight, bias,
                                                                           activation="silu"), rtol=0, atol=1e-6)
        start += length
    torch.testing.assert_close(final, alone_final, rtol=0, atol=1e-5)  # the last document's


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_a_packed_row_gives_each_document_its_logits_alone(tiny_model, stack, attn_implementation):
    model = tiny_model(stack, 3, attn_implementation=attn_implementation)
    generator = torch.Generator().manual_seed(1)
    documents = [torch.randint(3, model.config.mask_token_id, (n,), generator=generator) for n in DOCUMENTS]
    row = torch.cat(documents)[None]
    seq_idx = document_index(DOCUMENTS)
    positions = torch.cat([torch.arange(n) for n in DOCUMENTS])[None]
    with torch.no_grad():
        by_documents = model(row, seq_idx=seq_idx).logits
        by_positions = model(row, position_ids=positions).logits  # DataCollatorWithFlattening's form
        start = 0
        for document in documents:
            alone = model(document[None]).logits
            torch.testing.assert_close(by_documents[:, start : start + len(document)], alone, rtol=0, atol=1e-5)
            start += len(document)
    torch.testing.assert_close(by_positions, by_documents, rtol=0, atol=0)


def noised_examples(model, lengths, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, model.config.mask_token_id, (n,), generator=generator).tolist(),
             "noise_seed": seed + i} for i, n in enumerate(lengths)]


def test_the_padding_free_collator_packs_the_padded_batch_and_the_loss_and_gradients_agree(tiny_model, word_tokenizer,
                                                                                          stack):
    from diffuapriel_hf import DataCollatorForMaskedDiffusion

    model = tiny_model(stack, 2, attn_implementation="eager")
    tokenizer = word_tokenizer(model.config)
    examples = noised_examples(model, DOCUMENTS, seed=3)
    padded = DataCollatorForMaskedDiffusion(tokenizer)(examples)
    rows = DataCollatorForMaskedDiffusion(tokenizer, padding_free=True)(examples)
    assert set(rows) == {"input_ids", "labels", "loss_weights", "position_ids", "seq_idx"}
    real = padded["attention_mask"].bool()
    for name in ("input_ids", "labels", "loss_weights"):
        torch.testing.assert_close(rows[name], padded[name][real][None])
    assert torch.equal(rows["seq_idx"], document_index(DOCUMENTS))
    losses, gradients = [], []
    for batch in (padded, rows):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-5)
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_rows_are_refused_where_they_cannot_apply(tiny_model, word_tokenizer):
    from diffuapriel_hf import DataCollatorForMaskedDiffusion

    model = tiny_model("hybrid", 2)
    row = torch.randint(3, model.config.mask_token_id, (1, 8))
    with pytest.raises(ValueError, match="seq_idx must be an integer tensor"):
        model(row, seq_idx=torch.zeros(1, 7, dtype=torch.int32))
    with pytest.raises(ValueError, match="position_ids must be an integer tensor"):
        model(row, position_ids=torch.zeros(1, 8))
    with pytest.raises(ValueError, match="full-sequence models"):
        tiny_model("mamba", 2, block_size=4)(row, seq_idx=torch.zeros(1, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="padding_free"):
        DataCollatorForMaskedDiffusion(word_tokenizer(model.config), padding_free=True, block_size=4)


def test_trainer_trains_on_packed_rows(tiny_model, word_tokenizer, tmp_path):
    from transformers import Trainer, TrainingArguments

    from diffuapriel_hf import DataCollatorForMaskedDiffusion

    model = tiny_model("hybrid", 2)
    model.train()
    examples = noised_examples(model, DOCUMENTS * 2, seed=5)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[],
                             use_cpu=True, save_strategy="no", logging_steps=1)
    collator = DataCollatorForMaskedDiffusion(word_tokenizer(model.config), padding_free=True)
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collator)
    assert trainer.train().training_loss > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_packed_training_on_the_gpu_kernels(tiny_model, word_tokenizer, stack):
    """mamba-ssm's chunked scan and causal-conv1d with seq_idx, forward and backward, against the PyTorch path (the
    kernels' tf32 products: about 1e-3)."""
    from diffuapriel_hf import DataCollatorForMaskedDiffusion
    from diffuapriel_hf.modeling.mamba_ops import kernel_ops

    if kernel_ops() is None:
        pytest.skip("needs mamba-ssm")
    sizes = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, mamba_d_head=32, mamba_d_state=32,
                 mamba_n_groups=2, mamba_chunk_size=16, attn_implementation="sdpa")
    model = tiny_model(stack, 2, **sizes).train().cuda()
    rows = DataCollatorForMaskedDiffusion(word_tokenizer(model.config), padding_free=True)(
        noised_examples(model, [40, 9, 77, 1, 30], seed=7))
    rows = {name: tensor.cuda() for name, tensor in rows.items()}
    results = []
    for kernels in (False, True):
        model.config.use_mamba_kernels = kernels
        loss = model(**rows).loss
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        results.append((loss, torch.cat([g.flatten() for g in grads])))
    (expected_loss, expected_grads), (loss, grads) = results
    assert (loss - expected_loss).abs() <= 3e-3 * expected_loss.abs()
    assert (grads - expected_grads).norm() <= 3e-3 * expected_grads.norm()
