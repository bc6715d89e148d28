"""LoRA through PEFT: every projection of the three kinds of layer takes an adapter, and every task type PEFT offers
wraps the model for training, saving, reloading, merging and generate(); on the paths where a kernel reads a weight
directly (the MLP's stacked gate and up, the LM head), an adapted layer is called, so its adapter is never bypassed.
The same on CUDA with the kernels, and with bitsandbytes' 8-bit and 4-bit layers (the tests marked `gpu`:
`pip install peft bitsandbytes && python -m pytest -q -m gpu tests/test_peft.py`)."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from diffuapriel_hf import DataCollatorForMaskedDiffusion, DiffuAprielForMaskedLM
from diffuapriel_hf.modeling import mamba_ops
from diffuapriel_hf.modeling.kernel_policy import override_kernel_policy

peft = pytest.importorskip("peft")  # in the [test] extra

pytestmark = pytest.mark.usefixtures("one_thread")

# Every linear projection: the Mamba mixer's, attention's, the MLP's and the LM head.
LORA_TARGETS = ["in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "lm_head"]
# The CPU's version of each path on which a kernel reads a plain module's weight directly: the MLP's gate and up as one
# product of the stacked weights, the LM head's product over a padded vocabulary, the block norms' F.rms_norm.
DIRECT_READ_PATHS = dict(mlp_one_product_min_tokens=0, vocab_multiple=8, fused_rms_norm=True)


def lora_model(tiny_model, task_type=None, seed=1):
    """The hybrid tiny model (untied head) with LoRA on every projection, each adapter's B random rather than zero,
    so that every adapter changes the logits."""
    model = tiny_model("hybrid", sharpen=1.0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, task_type=task_type,
                             init_lora_weights=False)
    torch.manual_seed(seed)
    return peft.get_peft_model(model, config)


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_every_projection_takes_an_adapter(tiny_model):
    adapted = {name.rsplit(".", 1)[-1] for name, module in lora_model(tiny_model).named_modules()
               if isinstance(module, peft.tuners.lora.LoraLayer)}
    assert adapted == set(LORA_TARGETS)


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM", "TOKEN_CLS", "FEATURE_EXTRACTION", "SEQ_2_SEQ_LM"])
def test_each_task_type_trains_saves_reloads_and_merges(tiny_model, word_tokenizer, task_type, tmp_path):
    model = lora_model(tiny_model, task_type)
    tokenizer = word_tokenizer(model.config)
    texts = [" ".join(f"w{3 + (i * 7 + j) % 90}" for j in range(12)) for i in range(8)]
    dataset = [{"input_ids": tokenizer(text).input_ids} for text in texts]
    args = TrainingArguments(str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True)
    before = {name: p.clone() for name, p in model.named_parameters() if p.requires_grad}
    collator = DataCollatorForMaskedDiffusion(tokenizer)
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator).train()
    after = dict(model.named_parameters())
    assert before and all(name.count("lora_") for name in before)  # only the adapters train
    assert all(not torch.equal(before[name], after[name]) for name in before if "lora_B" in name)

    ids = torch.randint(3, model.config.mask_token_id, (2, 11))
    model.eval()
    expected = logits_of(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(tiny_model("hybrid", sharpen=1.0), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits_of(reloaded, ids), expected, rtol=0, atol=0)
    tokens = model.generate(input_ids=ids, max_new_tokens=6, steps=6, seed=0)
    merged = reloaded.merge_and_unload()
    torch.testing.assert_close(logits_of(merged, ids), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(merged.generate(ids, max_new_tokens=6, steps=6, seed=0), tokens)


def test_the_causal_lm_wrapper_calls_diffusion_generate(tiny_model):
    model = lora_model(tiny_model, "CAUSAL_LM").eval()
    ids = torch.randint(3, model.config.mask_token_id, (1, 5))
    out = model.generate(input_ids=ids, max_new_tokens=8, steps=4, return_dict_in_generate=True, seed=0)
    assert out.sequences.shape == (1, 13) and out.num_forward_passes == 4
    with pytest.raises(NotImplementedError, match="generates by diffusion, not token by token"):
        model.base_model.model.prepare_inputs_for_generation(ids)


def test_no_adapter_is_bypassed_where_kernels_read_weights(tiny_model):
    # With every adapter's B random, the adapted model equals its merged copy (plain layers, whose weights the
    # direct-read paths take) only if every adapter acted; an adapter bypassed would leave its layer's base weight.
    model = lora_model(tiny_model).eval()
    ids = torch.randint(3, model.config.mask_token_id, (2, 40))
    with override_kernel_policy(**DIRECT_READ_PATHS):
        adapted = logits_of(model, ids)
        with model.disable_adapter():
            base = logits_of(model, ids)
        merged = logits_of(model.merge_and_unload(), ids)
    torch.testing.assert_close(adapted, merged, rtol=1e-5, atol=1e-5)
    assert (adapted - base).abs().max() > 1e-2


# ---- CUDA: the kernels, and bitsandbytes' quantised layers --------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# Sizes at which every kernel applies (mamba-ssm's, causal-conv1d's, ours), as in tests/test_gpu_kernels.py.
GPU_SIZES = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, mamba_expand=2, mamba_d_head=32,
                 mamba_d_state=32, mamba_n_groups=2, mamba_chunk_size=64, intermediate_size=256)


def rel_err(actual, expected) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def gpu_model(tiny_model, dtype=torch.float32):
    return tiny_model("hybrid", num_layers=3, sharpen=1.0, **GPU_SIZES).to("cuda", dtype)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(mamba_ops.kernel_ops() is None, reason="needs mamba-ssm")
@pytest.mark.parametrize("grad_mode", [False, True], ids=["inference", "training"])
def test_no_adapter_is_bypassed_on_the_cuda_kernels(tiny_model, grad_mode):
    model = gpu_model(tiny_model)
    torch.manual_seed(1)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS,
                                                       init_lora_weights=False)).eval()
    ids = torch.randint(3, model.config.mask_token_id, (2, 300), device="cuda")
    with torch.set_grad_enabled(grad_mode), override_kernel_policy(mlp_one_product_min_tokens=0):
        adapted = model(input_ids=ids).logits.detach()
        with model.disable_adapter():
            base = model(input_ids=ids).logits.detach()
        merged = model.merge_and_unload()(ids).logits.detach()
    assert rel_err(adapted, merged) <= 3e-3  # the kernels' tf32 products
    assert rel_err(adapted, base) > 1e-1


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_loading_runs_every_quantised_layer_and_trains_lora(tiny_model, bits, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    model = gpu_model(tiny_model, torch.bfloat16)
    model.save_pretrained(tmp_path)
    quantization = (BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else
                    BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16))
    quantized = DiffuAprielForMaskedLM.from_pretrained(tmp_path, quantization_config=quantization,
                                                       dtype=torch.bfloat16, device_map="cuda").eval()
    quantized_layers = [name for name, module in quantized.named_modules()
                        if type(module).__module__.startswith("bitsandbytes")]
    assert {name.rsplit(".", 1)[-1] for name in quantized_layers} >= set(LORA_TARGETS) - {"lm_head"}
    ids = torch.randint(3, model.config.mask_token_id, (2, 300), device="cuda")
    with torch.no_grad():
        expected, actual = model(ids).logits, quantized(ids).logits
    error = rel_err(actual, expected)
    assert error <= (0.1 if bits == 8 else 0.3), f"{bits}-bit logits off by {error:.3f} (relative)"
    assert quantized.generate(ids[:, :20], max_new_tokens=8, steps=4, seed=0).shape == (2, 28)

    # QLoRA: adapters over the quantised layers train, and change the logits.
    torch.manual_seed(1)
    adapted = peft.get_peft_model(quantized, peft.LoraConfig(r=4, target_modules=LORA_TARGETS[:-1],
                                                             init_lora_weights=False))
    labels = ids.clone()
    noised = ids.masked_fill(torch.rand(ids.shape, device="cuda") < 0.5, model.config.mask_token_id)
    loss = adapted(input_ids=noised, labels=labels.masked_fill(noised != model.config.mask_token_id, -100)).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for name, p in adapted.named_parameters() if "lora_A" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        with adapted.disable_adapter():
            base = adapted(input_ids=ids).logits
        assert rel_err(adapted(input_ids=ids).logits, base) > 1e-2
