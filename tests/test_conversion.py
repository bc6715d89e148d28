"""Conversion of Mamba-2 language models (transformers' Mamba2ForCausalLM, mamba-ssm's MambaLMHeadModel) into
DiffuApriel: parity of the logits, the mask token, the backward direction, the MLP, and what is refused."""

import hashlib
import inspect
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
import torch.nn.functional as F
from transformers import Mamba2Config, Mamba2ForCausalLM, PreTrainedTokenizerFast
from transformers.models.mamba2 import modeling_mamba2

from diffuapriel_hf import DiffuAprielForMaskedLM
from diffuapriel_hf.cli import main as cli_main
from diffuapriel_hf.hub.convert import convert_checkpoint, read_state_dict
from diffuapriel_hf.modeling.kernel_policy import override_kernel_policy
from diffuapriel_hf.modeling.mamba_ops import kernel_ops

VOCAB = 50
# transformers < 5.2x normalised the gated RMSNorm over the whole width instead of per group (mamba-ssm's definition).
# 5.25 renamed its class MambaRMSNormGated to Mamba2RMSNormGated.
GATED_NORM = getattr(modeling_mamba2, "Mamba2RMSNormGated", None) or modeling_mamba2.MambaRMSNormGated
GROUPED_GATED_NORM = "group_size" in inspect.signature(GATED_NORM.__init__).parameters


pytestmark = pytest.mark.usefixtures("one_thread")


def random_mamba2(n_groups=1, tie=False, vocab=VOCAB, seed=0) -> Mamba2ForCausalLM:
    """A tiny transformers Mamba-2 LM whose every parameter is random (norm weights, D, A and dt included)."""
    torch.manual_seed(seed)
    config = Mamba2Config(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, state_size=8,
        n_groups=n_groups, chunk_size=8, expand=2, tie_word_embeddings=tie, layer_norm_epsilon=1e-5,
        pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    model = Mamba2ForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model


def tiny_tokenizer(vocab=VOCAB) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w3"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w3", pad_token="w1", bos_token="w0",
                                   eos_token="w2")


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("n_groups,tie", [(1, False), (2, False), (1, True)])
def test_transformers_mamba2_logits_reproduced(tmp_path, n_groups, tie):
    if n_groups > 1 and not GROUPED_GATED_NORM:
        pytest.skip("this transformers normalises Mamba2's gated RMSNorm over all groups at once (fixed in 5.2x)")
    source = random_mamba2(n_groups=n_groups, tie=tie)
    source.save_pretrained(tmp_path / "source")
    output = tmp_path / "converted"
    assert cli_main(["convert", str(tmp_path / "source"), str(output), "--no-bidirectional"]) == 0

    model = DiffuAprielForMaskedLM.from_pretrained(output).eval()
    assert model.config.vocab_size == VOCAB + 1 and model.config.mask_token_id == VOCAB
    assert model.config.intermediate_size == 0 and model.config.bidirectional is False
    assert model.model.layers[0].mlp is None and model.model.layers[0].mixer.right_to_left is None
    ids = torch.randint(0, VOCAB, (2, 19))  # not a whole number of chunks (8)
    diff = (logits(source, ids) - logits(model, ids)[..., :VOCAB]).abs().max().item()
    assert diff <= 1e-4, diff
    if tie:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_mask_token_row_is_the_mean_of_the_real_tokens(tmp_path):
    source = random_mamba2()
    source.save_pretrained(tmp_path / "source")
    model, tokenizer = convert_checkpoint(tmp_path / "source")
    assert tokenizer is None
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert embed.shape == (VOCAB + 1, 32) and head.shape == (VOCAB + 1, 32)
    torch.testing.assert_close(embed[:VOCAB], source.backbone.embeddings.weight)
    torch.testing.assert_close(embed[VOCAB], source.backbone.embeddings.weight.mean(0))
    torch.testing.assert_close(head[:VOCAB], source.lm_head.weight)
    torch.testing.assert_close(head[VOCAB], source.lm_head.weight.mean(0))


def test_a_mask_token_the_source_already_had_keeps_its_trained_rows(tmp_path):
    source = random_mamba2()
    source.save_pretrained(tmp_path / "source")
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"mask_token": "w7"})  # one of the source's 50 trained tokens
    with pytest.warns(UserWarning, match=r"mask token 'w7' \(id 7\) is one of the source's tokens: its trained"):
        model, tokenizer = convert_checkpoint(tmp_path / "source", tokenizer=tokenizer)
    assert model.config.mask_token_id == tokenizer.mask_token_id == 7 and model.config.vocab_size == VOCAB
    torch.testing.assert_close(model.model.embed_tokens.weight, source.backbone.embeddings.weight)
    torch.testing.assert_close(model.lm_head.weight, source.lm_head.weight)


def test_backward_direction_copied_or_fresh(tmp_path):
    source = random_mamba2()
    source.save_pretrained(tmp_path / "source")
    copied, _ = convert_checkpoint(tmp_path / "source")
    fresh, _ = convert_checkpoint(tmp_path / "source", backward_init="fresh")
    causal, _ = convert_checkpoint(tmp_path / "source", bidirectional=False)
    for layer_copied, layer_fresh in zip(copied.model.layers, fresh.model.layers):
        forward, backward = layer_copied.mixer.left_to_right, layer_copied.mixer.right_to_left
        for (name, p), q in zip(forward.named_parameters(), backward.parameters()):
            torch.testing.assert_close(p, q, msg=name)
            assert p.data_ptr() != q.data_ptr()  # copies, trained apart
        torch.testing.assert_close(layer_fresh.mixer.left_to_right.in_proj.weight, forward.in_proj.weight)
        assert not torch.equal(layer_fresh.mixer.right_to_left.in_proj.weight, forward.in_proj.weight)
        assert not torch.equal(layer_fresh.mixer.right_to_left.A_log, forward.A_log)
    # Bidirectional: a token now sees the tokens after it (the causal model does not).
    ids = torch.randint(0, VOCAB, (1, 12))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % VOCAB
    assert torch.equal(logits(causal, ids)[0, :-1], logits(causal, changed)[0, :-1])
    assert not torch.allclose(logits(copied, ids)[0, 0], logits(copied, changed)[0, 0])


def test_added_mlp_starts_as_identity(tmp_path):
    source = random_mamba2()
    source.save_pretrained(tmp_path / "source")
    model, _ = convert_checkpoint(tmp_path / "source", bidirectional=False, intermediate_size=48)
    assert model.config.intermediate_size == 48
    assert model.model.layers[1].mlp.gate_proj.weight.shape == (48, 32)
    assert not model.model.layers[1].mlp.up_proj.weight.eq(0).all()  # trainable from the first step
    ids = torch.randint(0, VOCAB, (2, 10))
    diff = (logits(source, ids) - logits(model, ids)[..., :VOCAB]).abs().max().item()
    assert diff <= 1e-4, diff


def test_tokenizer_gets_the_mask_token(tmp_path):
    source = random_mamba2()
    source.save_pretrained(tmp_path / "source")
    tiny_tokenizer().save_pretrained(tmp_path / "source")
    output = tmp_path / "converted"
    cli_main(["convert", str(tmp_path / "source"), str(output), "--mask-token", "[MASK]", "--repo-id", "me/diffu-tiny",
              "--base-model", "me/mamba2-tiny"])
    card = (output / "README.md").read_text()
    assert "base_model: me/mamba2-tiny" in card and 'from_pretrained("me/diffu-tiny"' in card
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output)
    config = json.loads((output / "config.json").read_text())
    assert tokenizer.mask_token == "[MASK]" and tokenizer.mask_token_id == VOCAB == config["mask_token_id"]
    assert len(tokenizer) == config["vocab_size"] == VOCAB + 1
    assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == (1, 0, 2)
    assert tokenizer("w5 [MASK]")["input_ids"] == [5, VOCAB]
    # The source's tokenizer padded on the right (a causal LM's default); the converted one pads on the left, as
    # generate() needs, also when saved.
    assert tiny_tokenizer().padding_side == "right" and tokenizer.padding_side == "left"
    assert json.loads((output / "tokenizer_config.json").read_text())["padding_side"] == "left"


def lay_out_as_the_hub_cache(cache, repo_id: str, folder, revision: str = "0123456789abcdef0123456789abcdef01234567"):
    """Put `folder`'s files into `cache` as huggingface_hub's cache holds a downloaded repo: the files as blobs named by
    their hash, a snapshot of links to them under the revision, and refs/main naming the revision."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for path in sorted(folder.iterdir()):
        blob = hashlib.sha256(path.read_bytes()).hexdigest()
        (repo / "blobs" / blob).write_bytes(path.read_bytes())
        (repo / "snapshots" / revision / path.name).symlink_to(Path("..", "..", "blobs", blob))


def test_transformers_checkpoints_are_read_by_transformers(tmp_path):
    # Sharded safetensors, as save_pretrained writes a large model, convert as a single file does.
    source = random_mamba2()
    source.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    model, _ = convert_checkpoint(tmp_path / "sharded", bidirectional=False)
    ids = torch.randint(0, VOCAB, (2, 9))
    torch.testing.assert_close(logits(model, ids)[..., :VOCAB], logits(source, ids), rtol=1e-4, atol=1e-4)
    # A weight missing from the checkpoint is named, not initialised afresh.
    from safetensors.torch import load_file, save_file

    source.save_pretrained(tmp_path / "partial")
    weights = load_file(tmp_path / "partial" / "model.safetensors")
    del weights["backbone.layers.1.mixer.D"]
    save_file(weights, tmp_path / "partial" / "model.safetensors", metadata={"format": "pt"})
    missing = r"do not match its config\.json: .*missing_keys.*backbone\.layers\.1\.mixer\.D"
    with pytest.raises(ValueError, match=missing):
        convert_checkpoint(tmp_path / "partial")


def test_a_hub_id_is_fetched_through_huggingface_hub(tmp_path):
    # `diffuapriel convert owner/name OUT` offline, against a Hub cache holding the repo: snapshot_download finds it.
    source = random_mamba2()
    source.save_pretrained(tmp_path / "source")
    tiny_tokenizer().save_pretrained(tmp_path / "source")
    lay_out_as_the_hub_cache(tmp_path / "hub", "someone/mamba2-tiny", tmp_path / "source")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "diffuapriel_command", "convert"]
    result = subprocess.run(command + ["someone/mamba2-tiny", str(tmp_path / "out"), "--no-bidirectional"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    converted = DiffuAprielForMaskedLM.from_pretrained(tmp_path / "out")
    ids = torch.randint(0, VOCAB, (2, 9))
    torch.testing.assert_close(logits(converted, ids)[..., :VOCAB], logits(source, ids), rtol=1e-4, atol=1e-4)
    assert "base_model: someone/mamba2-tiny" in (tmp_path / "out" / "README.md").read_text()
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_a_source_that_is_neither_a_folder_nor_a_fetchable_repo_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for missing, message in (("someone/absent", "someone/absent is not a folder, and the Hub repo someone/absent "
                                                "could not be fetched: "),
                             ("no//such", "no//such is neither a folder nor a Hub repo id (owner/name)")):
        assert cli_main(["convert", missing, str(tmp_path / "out")]) == 2
        assert capsys.readouterr().err.startswith(f"diffuapriel convert: error: {message}")


# ---- mamba-ssm's MambaLMHeadModel ----------------------------------------------------------------------------------

MAMBA_SSM_REAL_VOCAB, MAMBA_SSM_PAD_MULTIPLE = 45, 16  # embedding padded to 48 rows


def mamba_ssm_config(d_intermediate=0, **ssm_cfg):
    """config.json as mamba-ssm's `MambaLMHeadModel.save_pretrained` writes it (`MambaConfig.__dict__`)."""
    return {
        "d_model": 32, "d_intermediate": d_intermediate, "n_layer": 2, "vocab_size": MAMBA_SSM_REAL_VOCAB,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 8, **ssm_cfg},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": MAMBA_SSM_PAD_MULTIPLE, "tie_embeddings": True,
    }


def write_mamba_ssm_folder(folder, config, state_dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(state_dict, folder / "pytorch_model.bin")


def mamba_ssm_state_dict(reference: Mamba2ForCausalLM) -> dict:
    """mamba-ssm's key names for the weights of a transformers Mamba2 model (the same layer, the same math): only
    the embedding's name differs, and a tied head is saved under both names."""
    state_dict = {key.replace("backbone.embeddings.", "backbone.embedding."): value.clone()
                  for key, value in reference.state_dict().items()}
    state_dict["lm_head.weight"] = state_dict["backbone.embedding.weight"]
    return state_dict


def our_name(mamba_ssm_key: str) -> str:
    fixed = {"backbone.embedding.weight": "model.embed_tokens.weight", "backbone.norm_f.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
    if mamba_ssm_key in fixed:
        return fixed[mamba_ssm_key]
    layer, rest = re.fullmatch(r"backbone\.layers\.(\d+)\.(.+)", mamba_ssm_key).groups()
    if rest == "norm.weight":
        return f"model.layers.{layer}.input_layernorm.weight"
    return f"model.layers.{layer}.mixer.left_to_right.{rest.removeprefix('mixer.')}"


@pytest.mark.skipif(not GROUPED_GATED_NORM, reason="needs transformers' per-group gated RMSNorm (mamba-ssm's)")
def test_mamba_ssm_folder_weights_and_logits(tmp_path):
    rows = MAMBA_SSM_REAL_VOCAB + (-MAMBA_SSM_REAL_VOCAB % MAMBA_SSM_PAD_MULTIPLE)
    reference = random_mamba2(n_groups=2, tie=True, vocab=rows)
    state_dict = mamba_ssm_state_dict(reference)
    write_mamba_ssm_folder(tmp_path / "source", mamba_ssm_config(d_ssm=64), state_dict)  # d_ssm = the full width
    model, _ = convert_checkpoint(tmp_path / "source", bidirectional=False)

    # The mask token takes the first padding row: no new row.
    assert model.config.vocab_size == rows and model.config.mask_token_id == MAMBA_SSM_REAL_VOCAB
    assert (model.config.rms_norm_eps, model.config.mamba_n_groups, model.config.mamba_d_head) == (1e-5, 2, 8)
    converted = model.state_dict()
    for key, value in state_dict.items():
        ours = our_name(key)
        if key in ("backbone.embedding.weight", "lm_head.weight"):
            keep = [i for i in range(rows) if i != MAMBA_SSM_REAL_VOCAB]
            torch.testing.assert_close(converted[ours][keep], value[keep], msg=key)
            torch.testing.assert_close(converted[ours][MAMBA_SSM_REAL_VOCAB], value[:MAMBA_SSM_REAL_VOCAB].mean(0))
        else:
            torch.testing.assert_close(converted[ours], value, msg=key)
    ids = torch.randint(0, MAMBA_SSM_REAL_VOCAB, (2, 19))
    diff = (logits(reference, ids) - logits(model, ids))[..., :MAMBA_SSM_REAL_VOCAB].abs().max().item()
    assert diff <= 1e-4, diff


def test_mamba_ssm_gated_mlp_converted(tmp_path):
    # d_intermediate=100: mamba-ssm's GatedMLP rounds the width up to a multiple of 128.
    reference = random_mamba2(n_groups=2, tie=True, vocab=48)
    state_dict = mamba_ssm_state_dict(reference)
    torch.manual_seed(1)
    for i in range(2):
        state_dict[f"backbone.layers.{i}.norm2.weight"] = 1 + 0.1 * torch.randn(32)
        state_dict[f"backbone.layers.{i}.mlp.fc1.weight"] = torch.randn(2 * 128, 32) / 6
        state_dict[f"backbone.layers.{i}.mlp.fc2.weight"] = torch.randn(32, 128) / 12
    write_mamba_ssm_folder(tmp_path / "source", mamba_ssm_config(d_intermediate=100), state_dict)
    model, _ = convert_checkpoint(tmp_path / "source")
    assert model.config.intermediate_size == 128
    layer = model.model.layers[1]
    torch.testing.assert_close(layer.post_mixer_layernorm.weight, state_dict["backbone.layers.1.norm2.weight"])
    x = torch.randn(3, 32)
    value, gate = F.linear(x, state_dict["backbone.layers.1.mlp.fc1.weight"]).chunk(2, dim=-1)
    expected = F.linear(value * F.silu(gate), state_dict["backbone.layers.1.mlp.fc2.weight"])  # GatedMLP.forward
    with torch.no_grad():
        torch.testing.assert_close(layer.mlp(x), expected)


@pytest.mark.gpu
def test_mamba_ssm_model_logits_reproduced_on_gpu(tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("mamba_ssm")
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")  # fp32 dots in full precision, not TF32
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    fields = mamba_ssm_config()
    # use_mem_eff_path=False: the same math without the fused conv+scan kernel, which needs causal-conv1d installed.
    fields.update(d_model=64, ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 16,
                                       "use_mem_eff_path": False})
    config = MambaConfig(**fields)
    source = MambaLMHeadModel(config, device="cuda", dtype=torch.float32).eval()
    with torch.no_grad():
        for param in source.parameters():
            param.add_(0.1 * torch.randn_like(param))
    source.save_pretrained(str(tmp_path / "source"))
    model, _ = convert_checkpoint(tmp_path / "source", bidirectional=False)
    model = model.cuda()
    ids = torch.randint(0, MAMBA_SSM_REAL_VOCAB, (2, 40), device="cuda")
    # mamba-ssm's SSD kernels on both sides, so that only the converter can differ (the single-pass kernel, which the
    # policy takes for 40 tokens, has its own tests against mamba-ssm's in test_gpu_kernels.py).
    with torch.no_grad(), override_kernel_policy(mamba=kernel_ops(single_pass=False)):
        expected, ours = source(ids).logits, model(ids).logits
    diff = (expected - ours)[..., :MAMBA_SSM_REAL_VOCAB].abs().max().item()
    assert diff <= 1e-4, diff


# ---- what is refused -------------------------------------------------------------------------------------------------


class RunsCode:
    """Unpickling this calls `open(path, "w")`: a checkpoint that would run code when loaded unsafely."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    sentinel = tmp_path / "code_ran"
    write_mamba_ssm_folder(tmp_path / "source", mamba_ssm_config(), {"backbone.embedding.weight": RunsCode(sentinel)})
    with pytest.raises(ValueError, match="weights_only=True"):
        convert_checkpoint(tmp_path / "source")
    assert not sentinel.exists()


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    reference = random_mamba2(n_groups=2, tie=True, vocab=48)
    state_dict = mamba_ssm_state_dict(reference)
    state_dict["backbone.layers.1.mixer.D"] = torch.ones(5)
    write_mamba_ssm_folder(tmp_path / "source", mamba_ssm_config(), state_dict)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mixer\.left_to_right\.D has shape \(5,\).*\(8,\)"):
        convert_checkpoint(tmp_path / "source")
    del state_dict["backbone.layers.1.mixer.D"]
    state_dict["backbone.layers.1.mixer.extra"] = torch.ones(1)
    write_mamba_ssm_folder(tmp_path / "source", mamba_ssm_config(), state_dict)
    with pytest.raises(ValueError, match=r"left_to_right\.D is missing.*left_to_right\.extra is not expected"):
        convert_checkpoint(tmp_path / "source")


def test_unknown_architectures_are_refused(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match=r"found model_type='llama', architectures=\['LlamaForCausalLM'\].*expected"):
        convert_checkpoint(folder)
    write_mamba_ssm_folder(tmp_path / "mamba1", {**mamba_ssm_config(), "ssm_cfg": {}}, {})
    with pytest.raises(ValueError, match="Mamba1 layers.*only Mamba2"):
        convert_checkpoint(tmp_path / "mamba1")
    write_mamba_ssm_folder(tmp_path / "hdim", mamba_ssm_config(D_has_hdim=True), {})
    with pytest.raises(ValueError, match="D_has_hdim"):
        convert_checkpoint(tmp_path / "hdim")
    write_mamba_ssm_folder(tmp_path / "part_ssm", mamba_ssm_config(d_ssm=32), {})  # the rest of the width: an MLP
    with pytest.raises(ValueError, match="ssm_cfg.d_ssm = 32 is not supported"):
        convert_checkpoint(tmp_path / "part_ssm")
    write_mamba_ssm_folder(tmp_path / "odd", mamba_ssm_config(new_knob=3), {})
    with pytest.raises(ValueError, match="new_knob"):
        convert_checkpoint(tmp_path / "odd")


def test_safetensors_and_bin_sources_read_alike(tmp_path):
    source = random_mamba2()
    source.save_pretrained(tmp_path / "safetensors")
    source.save_pretrained(tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(source.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    from_safetensors, from_bin = read_state_dict(tmp_path / "safetensors"), read_state_dict(tmp_path / "bin")
    assert from_safetensors.keys() == from_bin.keys()
    for key in from_bin:
        torch.testing.assert_close(from_safetensors[key], from_bin[key])


@pytest.mark.parametrize("script", ["convert_transformers_mamba2.py", "convert_mamba_ssm.py"])
def test_conversion_scripts_take_their_own_format_only(tmp_path, monkeypatch, capsys, script):
    random_mamba2().save_pretrained(tmp_path / "source")
    output = tmp_path / "converted"
    monkeypatch.setattr(sys, "argv", [script, str(tmp_path / "source"), str(output), "--no-bidirectional"])
    path = str(Path(__file__).resolve().parents[1] / "conversion" / script)
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(path, run_name="__main__")
    if script == "convert_mamba_ssm.py":
        assert exited.value.code == 2 and not output.exists()
        error = capsys.readouterr().err.splitlines()[-1]  # after save_pretrained's progress bar
        assert error.startswith(f"{script}: error: ")
        assert "is a transformers checkpoint, but a mamba-ssm checkpoint was expected" in error
        return
    assert exited.value.code == 0
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md"} <= set(os.listdir(output))


def test_foreign_tokenizer_and_untied_head_refused(tmp_path):
    random_mamba2().save_pretrained(tmp_path / "source")
    tiny_tokenizer(vocab=VOCAB + 10).save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(ValueError, match=r"tokenizer has 61 tokens .* embedding has 50 rows"):
        convert_checkpoint(tmp_path / "source", tokenizer=tmp_path / "tokenizer")
    state_dict = mamba_ssm_state_dict(random_mamba2(n_groups=2, tie=True, vocab=48))
    state_dict["lm_head.weight"] = state_dict["lm_head.weight"] + 1
    write_mamba_ssm_folder(tmp_path / "untied", mamba_ssm_config(), state_dict)
    with pytest.raises(ValueError, match="tied in config.json but lm_head.weight differs"):
        convert_checkpoint(tmp_path / "untied")


def test_dtype_follows_the_source_unless_given(tmp_path):
    random_mamba2().to(torch.bfloat16).save_pretrained(tmp_path / "source")
    model, _ = convert_checkpoint(tmp_path / "source", backward_init="fresh")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _ = convert_checkpoint(tmp_path / "source", bidirectional=False, dtype=torch.float32)
    source = Mamba2ForCausalLM.from_pretrained(tmp_path / "source", dtype=torch.float32).eval()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ids = torch.randint(0, VOCAB, (1, 9))
    assert (logits(source, ids) - logits(model, ids)[..., :VOCAB]).abs().max() <= 1e-4
