"""Block diffusion models (config.block_size): a block's logits depend on it and the blocks before it only, and the
one-forward two-stream training loss (and its gradients) equals its definition computed block by block."""

import dataclasses

import pytest
import torch
from transformers import Trainer, TrainingArguments

from diffuapriel_hf import DataCollatorForMaskedDiffusion, preset_config
from diffuapriel_hf.modeling.diffusion import elbo_times, masked_diffusion_loss, noise_tokens
from diffuapriel_hf.modeling.kernel_policy import override_kernel_policy
from diffuapriel_hf.modeling.mamba_ops import TORCH_OPS, kernel_ops, mamba_chunk_scan_combined_reference
from diffuapriel_hf.modeling.cache import BlockContext

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = 4


@pytest.fixture
def block_model(tiny_model):
    """A tiny block diffusion model (blocks of BLOCK tokens) of a stack's kind, attention eager."""
    return lambda kind, **overrides: tiny_model(kind, **{"block_size": BLOCK, "attn_implementation": "eager",
                                                         **overrides})


def random_ids(config, batch: int, length: int, generator) -> torch.Tensor:
    return torch.randint(3, config.mask_token_id, (batch, length), generator=generator)


@pytest.mark.parametrize("length", [12, 10])
def test_a_block_reads_itself_and_earlier_blocks_only(block_model, stack, length):
    model = block_model(stack)
    generator = torch.Generator().manual_seed(1)
    ids = random_ids(model.config, 2, length, generator)
    with torch.no_grad():
        logits = model(ids).logits
        for block_start in range(0, length, BLOCK):
            changed = ids.clone()
            changed[:, block_start + BLOCK - 1 :] = random_ids(model.config, 2, length, generator)[
                :, block_start + BLOCK - 1 :
            ]  # the block's last token and everything after it
            new = model(changed).logits
            # Earlier blocks are untouched; inside the block, the positions before the change see it (right to left).
            torch.testing.assert_close(new[:, :block_start], logits[:, :block_start], rtol=0, atol=1e-5)
            if block_start + BLOCK - 1 < length and block_start + BLOCK - 1 > block_start:
                assert not torch.allclose(new[:, block_start], logits[:, block_start], atol=1e-4)


def test_a_full_sequence_model_reads_the_whole_sequence(block_model):
    model = block_model("mamba", block_size=None)
    ids = random_ids(model.config, 1, 12, torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[:, 2 * BLOCK] = (changed[:, 2 * BLOCK] + 1) % model.config.mask_token_id
    with torch.no_grad():  # the last position of the block before the change sees it, as a block model's does not
        assert not torch.allclose(model(ids).logits[:, 2 * BLOCK - 1], model(changed).logits[:, 2 * BLOCK - 1],
                                  atol=1e-4)


def noised_batch(config, length: int, padded: bool, generator):
    """A batch noised block by block, its per-position loss weights (1 / the block's t) and padding."""
    batch = 2
    clean = random_ids(config, batch, length, generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    if padded:
        attention_mask[1, length - 3 :] = 0
        clean[1, length - 3 :] = config.pad_token_id
    t = torch.rand(batch, -(-length // BLOCK), generator=generator).clamp(min=0.2)  # (B, n)
    t_per_position = t.repeat_interleave(BLOCK, dim=1)[:, :length]
    masked = (torch.rand(batch, length, generator=generator) < t_per_position) & attention_mask.bool()
    noised = clean.masked_fill(masked, config.mask_token_id)
    labels = clean.masked_fill(~masked, -100)
    loss_weights = attention_mask / t_per_position
    return noised, clean, labels, loss_weights, attention_mask


def loss_block_by_block(model, noised, clean, labels, loss_weights, attention_mask):
    """BD3-LM's loss by its definition: for each block, the model over the clean blocks before it and that noised
    block, the block's logits scored."""
    length = noised.shape[1]
    logits = []
    for start in range(0, length, BLOCK):
        end = min(start + BLOCK, length)
        inputs = torch.cat([clean[:, :start], noised[:, start:end]], dim=1)
        logits.append(model(inputs, attention_mask=attention_mask[:, :end]).logits[:, start:end])
    return masked_diffusion_loss(torch.cat(logits, dim=1), labels, loss_weights, model.config.mask_token_id)


@pytest.mark.parametrize("length,padded", [(12, False), (10, False), (10, True)])
@pytest.mark.parametrize("block_documents", [False, True], ids=["blocks as rows", "blocks as documents"])
def test_two_stream_loss_and_gradients_equal_the_block_by_block_definition(block_model, stack, length, padded,
                                                                           block_documents):
    model = block_model(stack)
    noised, clean, labels, loss_weights, attention_mask = noised_batch(
        model.config, length, padded, torch.Generator().manual_seed(3)
    )
    with override_kernel_policy(block_documents=block_documents):  # how the right-to-left direction reads blocks
        loss = model(noised, attention_mask=attention_mask, labels=labels, loss_weights=loss_weights).loss
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    expected = loss_block_by_block(model, noised, clean, labels, loss_weights, attention_mask)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for (name, _), grad, expected_grad in zip(model.named_parameters(), grads, expected_grads):
        if expected_grad is None:
            assert grad is None or not grad.any(), name
        else:
            torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5, msg=name)


def test_elbo_is_the_block_factorised_bound(block_model):
    model = block_model("hybrid")
    config = model.config
    ids = random_ids(config, 2, 10, torch.Generator().manual_seed(6))
    attention_mask = torch.ones_like(ids)
    attention_mask[0, -2:] = 0
    nelbo = model.compute_elbo(ids, attention_mask=attention_mask, num_samples=3, seed=7)
    generator, expected = torch.Generator().manual_seed(7), torch.zeros(2)
    with torch.no_grad():
        for t in elbo_times(3).tolist():
            noised, masked = noise_tokens(ids, torch.full((2,), t), config.mask_token_id, attention_mask.bool(),
                                          generator)
            labels = ids.masked_fill(~masked, -100)
            for row in range(2):  # each row's terms alone, with the per-row weight 1/t
                weights = attention_mask[row : row + 1] / t
                loss = loss_block_by_block(model, noised[row : row + 1], ids[row : row + 1], labels[row : row + 1],
                                           weights, attention_mask[row : row + 1])
                expected[row] += loss * (weights > 0).sum()
    torch.testing.assert_close(nelbo, expected / 3, rtol=1e-5, atol=1e-4)


def test_two_stream_needs_input_ids(block_model):
    model = block_model("mamba")
    ids = random_ids(model.config, 1, 8, torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=model.get_input_embeddings()(ids), labels=ids)
    with pytest.raises(ValueError, match="two_stream needs a block diffusion model"):
        block_model("mamba", block_size=None).model(ids, two_stream=True)


def test_refused_with_flash_attention_and_the_approximate_cache(block_model):
    model = block_model("hybrid")
    ids = random_ids(model.config, 1, 8, torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="does not apply to a block diffusion model"):
        model(ids, block_context=BlockContext(0, 4))
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2.*cannot run a block diffusion model"):
        model(ids)


def test_short_rows_are_scanned_in_a_short_chunk_with_the_same_result(block_model, tiny_model):
    """A block model folds each block into a row of its own: its SSD takes the least power-of-two chunk (16 at least)
    that holds such a row instead of padding every row to a whole `mamba_chunk_size`; the scan's result is the same.
    A full-sequence model keeps its chunk. The reference runs in its own chunk (`TORCH_OPS.chunk_size`) whatever the
    model's."""
    mixer = block_model("mamba", mamba_chunk_size=256).model.layers[0].mixer.left_to_right
    model_chunk = dataclasses.replace(TORCH_OPS, chunk_size=None)  # as mamba-ssm's kernels: the model's chunk
    lengths = (4, 16, 17, 200, 256, 1000)
    assert [mixer.chunk_size_for(n, model_chunk) for n in lengths] == [16, 16, 32, 256, 256, 256]
    assert [mixer.chunk_size_for(n, TORCH_OPS) for n in lengths] == [16, 16, 32, 64, 64, 64]
    full_sequence = tiny_model("mamba", mamba_chunk_size=256).model.layers[0].mixer.left_to_right
    assert full_sequence.chunk_size_for(4, model_chunk) == 256
    assert full_sequence.chunk_size_for(4, TORCH_OPS) == TORCH_OPS.chunk_size == 64
    generator = torch.Generator().manual_seed(0)
    rows, length, heads, head_dim, state = 6, BLOCK, 2, 4, 8
    x = torch.randn(rows, length, heads, head_dim, generator=generator)
    dt = torch.rand(rows, length, heads, generator=generator)
    A = -torch.rand(heads, generator=generator)
    B, C = (torch.randn(rows, length, 1, state, generator=generator) for _ in range(2))
    initial = torch.randn(rows, heads, head_dim, state, generator=generator)
    scans = [mamba_chunk_scan_combined_reference(x, dt, A, B, C, chunk, initial_states=initial,
                                                 return_final_states=True) for chunk in (16, 256)]
    for short, whole in zip(*scans):
        torch.testing.assert_close(short, whole, rtol=1e-6, atol=1e-6)


def test_block_size_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="block_size"):
        preset_config("tiny", block_size=0)


def relative_error(actual, expected) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return ((actual - expected).norm() / expected.norm()).item()


def loss_and_grads(model, batch):
    noised, _, labels, loss_weights, attention_mask = batch
    loss = model(noised, attention_mask=attention_mask, labels=labels, loss_weights=loss_weights).loss
    return loss, torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_two_stream_training_on_the_gpu_kernels(block_model, stack):
    """The two-stream pass on CUDA (mamba-ssm's chunked scan with per-block initial states, forward and backward)
    against the PyTorch path, in float32 (the kernels' tf32 products: about 1e-3), under bf16 autocast (about 1e-2),
    and with gradient checkpointing (the same numbers)."""
    if kernel_ops() is None:
        pytest.skip("needs mamba-ssm")
    sizes = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, mamba_d_head=32, mamba_d_state=32,
                 mamba_n_groups=2, mamba_chunk_size=64, block_size=16, attn_implementation="sdpa")
    model = block_model(stack, **sizes).train().cuda()
    batch = [t.cuda() for t in noised_batch(model.config, 100, True, torch.Generator().manual_seed(8))]
    model.config.use_mamba_kernels = False
    expected_loss, expected_grads = loss_and_grads(model, batch)
    model.config.use_mamba_kernels = True
    loss, grads = loss_and_grads(model, batch)
    assert relative_error(loss, expected_loss) <= 3e-3
    # All gradients at 3e-3 together; each tensor at 1e-2, as the tf32 error of small-norm ones is larger (a
    # dt_bias gradient of norm 1e-8 came out at 4.6e-3 on an H100).
    assert relative_error(torch.cat([g.flatten() for g in grads]),
                          torch.cat([g.flatten() for g in expected_grads])) <= 3e-3
    for grad, expected in zip(grads, expected_grads):
        if expected.norm() > 0:
            assert relative_error(grad, expected) <= 1e-2
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16_loss, _ = loss_and_grads(model, batch)
    assert relative_error(bf16_loss, expected_loss) <= 2e-2
    model.gradient_checkpointing_enable()
    checkpointed_loss, checkpointed_grads = loss_and_grads(model, batch)
    torch.testing.assert_close(checkpointed_loss, loss)
    for grad, checkpointed in zip(grads, checkpointed_grads):
        torch.testing.assert_close(checkpointed, grad)


def test_collator_noises_each_block_at_its_own_time(word_tokenizer):
    tokenizer = word_tokenizer(preset_config("tiny"))
    collator = DataCollatorForMaskedDiffusion(tokenizer, block_size=BLOCK)
    examples = [{"input_ids": list(range(3, 13)), "noise_seed": seed} for seed in range(3)]
    batch = collator(examples)
    weights = batch["loss_weights"]  # (3, 10): 1/t, one t per block of 4
    for start in range(0, 10, BLOCK):
        block = weights[:, start : start + BLOCK]
        assert torch.equal(block, block[:, :1].expand_as(block))
    t = 1 / weights[:, ::BLOCK]  # (3, 3 blocks)
    u = (t.flatten() - 1e-3) / (1 - 1e-3)
    assert torch.equal(torch.sort((u * 9 + 1e-4).floor().long()).values, torch.arange(9))  # stratified
    assert torch.equal(collator(examples)["input_ids"], batch["input_ids"])  # seeded: the same noise
    with pytest.raises(ValueError, match="block_size"):
        DataCollatorForMaskedDiffusion(tokenizer, block_size=0)


def test_trainer_trains_a_block_model(block_model, word_tokenizer, tmp_path):
    model = block_model("hybrid").train()
    tokenizer = word_tokenizer(model.config)
    generator = torch.Generator().manual_seed(9)
    dataset = [{"input_ids": random_ids(model.config, 1, 10, generator)[0].tolist()} for _ in range(8)]
    before = [p.detach().clone() for p in model.parameters()]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[],
                             use_cpu=True, save_strategy="no", logging_steps=1, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForMaskedDiffusion(tokenizer, block_size=BLOCK))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
