import functools
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM
from transformers.modeling_outputs import MaskedLMOutput

from diffuapriel_hf import DiffuAprielConfig, DiffuAprielForMaskedLM, DiffuAprielModel
from diffuapriel_hf.modeling import kernel_policy, modeling_diffuapriel
from diffuapriel_hf.modeling.configuration_diffuapriel import MAMBA
from diffuapriel_hf.modeling.cuda_graphs import GraphedDenoiser
from diffuapriel_hf.modeling.fused_ops import TRITON_INSTALLED
from diffuapriel_hf.modeling.kernel_policy import (
    DISPATCH_THRESHOLDS,
    REFERENCE_POLICY,
    override_kernel_policy,
    resolve_kernel_policy,
)
from diffuapriel_hf.modeling.mamba_ops import TORCH_OPS, MambaOps, kernel_ops
from diffuapriel_hf.modeling.modeling_diffuapriel import _padding_mask


@pytest.fixture
def tiny_model(tiny_model):
    """The shared tiny model with three layers, so that the hybrid's attention layer sits between two Mamba layers."""
    return functools.partial(tiny_model, num_layers=3)


def random_ids(config, *shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, config.mask_token_id, shape, generator=generator)


def test_forward_shapes_and_auto_classes(stack, tmp_path, tiny_model):
    model = tiny_model(stack)
    ids = random_ids(model.config, 2, 13)
    out = model(ids)
    assert isinstance(out, MaskedLMOutput)
    assert out.logits.shape == (2, 13, model.config.vocab_size)
    assert torch.isfinite(out.logits).all()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert isinstance(AutoModelForMaskedLM.from_pretrained(tmp_path), DiffuAprielForMaskedLM)
    assert isinstance(AutoModel.from_pretrained(tmp_path), DiffuAprielModel)


@pytest.mark.parametrize("kind", ["mamba", "hybrid"])
def test_position_zero_sees_the_last_token_only_when_bidirectional(kind, tiny_model):
    ids = random_ids(tiny_model(kind).config, 1, 12)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 90 + 3
    for bidirectional in (True, False):
        model = tiny_model(kind, seed=3, bidirectional=bidirectional)
        with torch.no_grad():
            for parameter in model.parameters():  # larger than the initialisation, so that influence is visible
                parameter.normal_(0, 0.3)
            delta = (model(ids).logits[0, 0] - model(changed).logits[0, 0]).abs().max()
        if bidirectional or kind == "hybrid":  # attention layers always look both ways
            assert delta > 1e-4
        else:
            assert delta == 0


def test_causal_stack_has_no_backward_parameters(tiny_model):
    model = tiny_model("mamba", bidirectional=False)
    names = [name for name, _ in model.named_parameters()]
    assert not any("right_to_left" in name for name in names)
    assert any("left_to_right" in name for name in names)


def test_inputs_embeds_equal_input_ids(tiny_model):
    model = tiny_model("hybrid")
    ids = random_ids(model.config, 2, 9)
    with torch.no_grad():
        from_ids = model(ids).logits
        from_embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    torch.testing.assert_close(from_embeds, from_ids)


def test_hidden_states_and_attentions_follow_hybrid_conventions(tiny_model):
    model = tiny_model("hybrid", attn_implementation="eager")
    ids = random_ids(model.config, 2, 9)
    out = model(ids, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1  # embeddings + one per layer
    torch.testing.assert_close(out.hidden_states[0], model.model.embed_tokens(ids))
    assert len(out.attentions) == 1  # one map per attention layer
    assert out.attentions[0].shape == (2, model.config.num_attention_heads, 9, 9)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 9))
    torch.testing.assert_close(out.hidden_states[-1], model.model(ids).last_hidden_state)  # the last one normed
    as_tuple = model(ids, output_hidden_states=True, output_attentions=True, return_dict=False)
    assert len(as_tuple) == 3 and len(as_tuple[1]) == 4 and len(as_tuple[2]) == 1


def test_output_attentions_under_sdpa_returns_no_maps_as_transformers_models_do(tiny_model):
    """transformers' convention (its SDPA interface warns once; its models then return no map for those layers)."""
    model = tiny_model("hybrid", attn_implementation="sdpa")
    ids = random_ids(model.config, 2, 9)
    with torch.no_grad():
        out = model(ids, output_attentions=True, output_hidden_states=True)
        torch.testing.assert_close(out.logits, model(ids).logits)
    assert out.attentions == ()
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1


@pytest.mark.parametrize("kind", ["hybrid", "mamba"])
def test_offloading_to_cpu_and_disk_gives_the_same_logits_and_tokens(tiny_model, kind, tmp_path):
    """accelerate's offload hooks load a module's weights when it is called: every layer calls its parts, and the
    kernels read weights directly only from plain modules, so a model spread over the execution device, offloaded
    CPU memory and disk computes what it computes whole."""
    model = tiny_model(kind, seed=8)
    ids = random_ids(model.config, 2, 9)
    model.save_pretrained(tmp_path / "model")
    budget = sum(p.numel() * p.element_size() for p in model.parameters()) * 2 // 3
    offloaded = DiffuAprielForMaskedLM.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": budget}, offload_folder=tmp_path / "offload"
    )
    assert "disk" in offloaded.hf_device_map.values()
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    generate = dict(max_new_tokens=6, steps=3, seed=0)
    assert torch.equal(offloaded.generate(ids[:, :4], **generate), model.generate(ids[:, :4], **generate))


def test_logits_are_untouched_and_loss_excludes_the_mask_token(tiny_model):
    model = tiny_model("mamba")
    ids = random_ids(model.config, 2, 8)
    out = model(ids)
    expected = model.lm_head(model.model(ids).last_hidden_state)
    torch.testing.assert_close(out.logits, expected)
    assert torch.isfinite(out.logits[..., model.config.mask_token_id]).all()
    labels = ids.clone()
    loss = model(ids, labels=labels).loss
    logits = out.logits.clone()
    logits[..., model.config.mask_token_id] = float("-inf")
    manual = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
    torch.testing.assert_close(loss, manual)


def test_no_sequence_length_is_refused(tiny_model):
    model = tiny_model("hybrid")
    ids = random_ids(model.config, 1, model.config.max_position_embeddings + 5)
    with torch.no_grad():
        assert model(ids).logits.shape[1] == ids.shape[1]


def test_logits_to_keep_computes_the_named_positions_only(tiny_model):
    model = tiny_model("hybrid", seed=3)
    ids = random_ids(model.config, 2, 9)
    with torch.no_grad():
        full = model(ids).logits
        torch.testing.assert_close(model(ids, logits_to_keep=3).logits, full[:, -3:])
        positions = torch.tensor([4, 0, 7])
        torch.testing.assert_close(model(ids, logits_to_keep=positions).logits, full[:, positions])
        assert model(ids, logits_to_keep=0).logits.shape == full.shape
    with pytest.raises(ValueError, match="every position"):
        model(ids, labels=ids, logits_to_keep=2)
    with pytest.raises(ValueError, match="logits_to_keep must be in"):
        model(ids, logits_to_keep=10)
    with pytest.raises(ValueError, match="outside the sequence"):
        model(ids, logits_to_keep=torch.tensor([9]))
    with pytest.raises(ValueError, match="1-D integer"):
        model(ids, logits_to_keep=torch.tensor([1.0]))
    with pytest.raises(TypeError, match="logits_to_keep"):
        model(ids, logits_to_keep=1.5)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_an_empty_batch_gives_empty_outputs(tiny_model, stack, implementation):
    model = tiny_model(stack, attn_implementation=implementation)
    ids = random_ids(model.config, 0, 5)
    with torch.no_grad():
        for mask in (None, torch.ones_like(ids)):
            out = model(ids, attention_mask=mask, output_hidden_states=True)
            assert out.logits.shape == (0, 5, model.config.vocab_size)
            assert len(out.hidden_states) == model.config.num_hidden_layers + 1


@pytest.mark.parametrize("kind", ["mamba", "hybrid"])
def test_a_mask_of_ones_is_read_only_where_reading_costs_no_synchronisation(kind, tiny_model, monkeypatch):
    """On the CPU a mask of ones is read and the unpadded path taken; where reading it would synchronise (a mask on
    CUDA), it is kept and the padding path taken, with the same logits. The second case is forced here by counting
    every read as one that synchronises (tests/test_gpu_kernels.py runs it on CUDA under sync debug mode)."""
    model = tiny_model(kind)
    ids = random_ids(model.config, 2, 13)
    ones = torch.ones_like(ids)
    hidden_states = model.model.embed_tokens(ids)
    assert _padding_mask(hidden_states, ones, None) is None
    expected = model(ids).logits
    monkeypatch.setattr(modeling_diffuapriel, "_costs_no_sync", lambda tensor: False)
    assert torch.equal(_padding_mask(hidden_states, ones, None), ones.bool())
    torch.testing.assert_close(model(ids, attention_mask=ones).logits, expected, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_clear_errors(tiny_model):
    model = tiny_model("hybrid")
    ids = random_ids(model.config, 2, 5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(ids + model.config.vocab_size)
    negative = ids.clone()
    negative[1, 2] = -1
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(negative)
    with pytest.raises(ValueError, match="2-D"):
        model(ids[0])
    with pytest.raises(TypeError, match="integer"):
        model(ids.float())
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="hidden_size"):
        model(inputs_embeds=torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="mask_token_id"):
        tiny_model("mamba", mask_token_id=None)(ids, labels=ids)
    with pytest.raises(ValueError, match="no tokens"):
        model(ids[:, :0])
    with pytest.raises(ValueError, match="only 0 .padding. and 1"):
        model(ids, attention_mask=torch.full((2, 5), 0.5))
    for bad_label in (model.config.vocab_size, -1, model.config.mask_token_id):
        labels = torch.full_like(ids, -100)
        labels[0, 1] = bad_label
        with pytest.raises(ValueError, match="labels must be -100"):
            model(ids, labels=labels)
    with pytest.raises(TypeError, match="labels must be an integer"):
        model(ids, labels=ids.float())


def test_the_kernel_policy_follows_the_device_grad_mode_and_config():
    config = DiffuAprielConfig.from_preset("tiny")
    assert resolve_kernel_policy(config, torch.device("cpu")) is REFERENCE_POLICY
    with torch.no_grad():
        on_cuda = resolve_kernel_policy(config, "cuda")  # resolving needs no GPU: it reads the device type
    assert on_cuda.fused_rms_norm and on_cuda.fused_elementwise == on_cuda.fused_swiglu == TRITON_INSTALLED
    assert on_cuda.fused_rotary == TRITON_INSTALLED
    assert on_cuda.vocab_multiple == DISPATCH_THRESHOLDS["lm_head_vocab_multiple"].value
    assert on_cuda.vocab_padding_min_tokens == DISPATCH_THRESHOLDS["lm_head_padding_min_tokens"].value
    assert on_cuda.mlp_one_product_min_tokens == DISPATCH_THRESHOLDS["mlp_one_product_min_tokens"].value
    assert on_cuda.mamba.name == ("torch" if kernel_ops() is None else "kernels")
    assert on_cuda.cache_attention == TRITON_INSTALLED
    assert on_cuda.mamba.split_conv1d_scan is None and not on_cuda.block_documents
    with torch.enable_grad():  # the forward-only Triton kernels stay out of grad mode; training's own paths
        training = resolve_kernel_policy(config, "cuda")
        assert training.fused_elementwise == training.fused_swiglu == training.fused_rotary == TRITON_INSTALLED
        assert training.fused_reading_orders == TRITON_INSTALLED
        assert training.mlp_one_product_min_tokens == 0  # whose SwiGLU has a backward kernel
        assert not training.cache_attention
        assert (training.mamba.split_conv1d_scan is not None) == (kernel_ops() is not None)
        assert training.block_documents
    with torch.no_grad():  # eager attention keeps its maps, against the cache too
        eager = DiffuAprielConfig.from_preset("tiny", attn_implementation="eager")
        assert not resolve_kernel_policy(eager, "cuda").cache_attention
    assert resolve_kernel_policy(DiffuAprielConfig.from_preset("tiny", use_mamba_kernels=False), "cuda").mamba is TORCH_OPS


def test_training_asks_for_the_training_pass_and_inference_for_neither_mixer_function(monkeypatch):
    """On CUDA the kernels' MambaOps in grad mode carry whole mixer passes, by `training_mixer` where it takes them
    (timed: results/training_fusions_walk.json); without grad, neither."""
    asked = []

    def recording_kernel_ops(**options):
        asked.append(options)
        return TORCH_OPS

    monkeypatch.setattr(kernel_policy, "kernel_ops", recording_kernel_ops)
    kernel_policy._default_policy.cache_clear()
    try:
        config = DiffuAprielConfig.from_preset("tiny")
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                resolve_kernel_policy(config, "cuda")
    finally:
        kernel_policy._default_policy.cache_clear()
    assert asked == [dict(split_conv1d_scan=True, training_pass=True), dict(split_conv1d_scan=False,
                                                                            training_pass=False)]


def test_every_dispatch_threshold_cites_a_result_file_that_exists_and_is_the_one_applied(tiny_model):
    root = Path(__file__).resolve().parent.parent
    for name, threshold in DISPATCH_THRESHOLDS.items():
        for source in threshold.source.split(", "):
            assert source.startswith("benchmarks/results/") and (root / source).is_file(), (name, source)
    # The modules that apply a threshold read it from the table.
    assert GraphedDenoiser(tiny_model()).max_tokens == DISPATCH_THRESHOLDS["graph_max_tokens"].value


@pytest.mark.skipif(kernel_ops() is not None, reason="mamba-ssm is installed")
def test_missing_mamba_kernels_fall_back_to_pytorch_with_one_warning():
    kernel_policy._default_policy.cache_clear()
    kernel_policy._warn_kernels_missing.cache_clear()
    config = DiffuAprielConfig.from_preset("tiny")
    with pytest.warns(UserWarning, match="mamba-ssm is not installed") as caught:
        for grad in (True, False, True):
            with torch.set_grad_enabled(grad):
                assert resolve_kernel_policy(config, "cuda").mamba is TORCH_OPS
    assert len([w for w in caught if "mamba-ssm" in str(w.message)]) == 1


def test_the_lm_head_pads_its_vocabulary_only_from_the_policys_token_count(tiny_model, monkeypatch):
    """A 32-token block step does not earn back the copy of the head that padding makes."""
    model = tiny_model("mamba")
    multiples = []
    original = modeling_diffuapriel.vocab_logits
    monkeypatch.setattr(modeling_diffuapriel, "vocab_logits", lambda hidden, weight, multiple=1: (
        multiples.append(multiple) or original(hidden, weight, multiple)))
    with torch.no_grad(), override_kernel_policy(vocab_multiple=64, vocab_padding_min_tokens=12):
        short, long = model(random_ids(model.config, 2, 5)).logits, model(random_ids(model.config, 2, 6)).logits
    assert multiples == [1, 64]  # 10 tokens unpadded, 12 padded
    assert short.shape[-1] == long.shape[-1] == model.config.vocab_size


def test_override_kernel_policy_reaches_every_layer_and_restores_the_policy(tiny_model):
    """The context manager tests and benchmarks switch paths with: a recording MambaOps sees every Mamba direction's
    calls, the one-product MLP and the padded LM head give the same logits, and the policy is restored on exit."""
    model = tiny_model("hybrid", seed=9)
    ids = random_ids(model.config, 2, 9)
    calls = []

    def recording(operation):
        def call(*args, **kwargs):
            calls.append(operation.__name__)
            return operation(*args, **kwargs)
        return call

    recording_ops = MambaOps("recording", *(recording(op) for op in (
        TORCH_OPS.chunk_scan, TORCH_OPS.causal_conv1d, TORCH_OPS.rmsnorm, TORCH_OPS.state_passing,
        TORCH_OPS.chunk_state, TORCH_OPS.chunk_scan_from_states)))
    with torch.no_grad():
        expected = model(ids).logits
        with override_kernel_policy(mamba=recording_ops, mlp_one_product_min_tokens=1, vocab_multiple=64):
            assert resolve_kernel_policy(model.config, "cpu").vocab_multiple == 64
            with override_kernel_policy(vocab_multiple=1):  # nested: the inner value, the outer ones kept
                assert resolve_kernel_policy(model.config, "cpu").vocab_multiple == 1
                assert resolve_kernel_policy(model.config, "cpu").mamba is recording_ops
            overridden = model(ids).logits
        assert resolve_kernel_policy(model.config, "cpu") is REFERENCE_POLICY
    directions = 2 * model.config.layer_types.count(MAMBA)
    assert sorted(set(calls)) == sorted(op.__name__ for op in (TORCH_OPS.chunk_scan, TORCH_OPS.causal_conv1d,
                                                               TORCH_OPS.rmsnorm))
    assert len(calls) == 3 * directions
    torch.testing.assert_close(overridden, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="unknown KernelPolicy fields"):
        with override_kernel_policy(fused_everything=True):
            pass
