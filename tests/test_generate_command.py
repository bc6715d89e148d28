"""`diffuapriel generate`: prompt, stdin, infill, sampling options, progress bar, errors."""

import argparse
import io
import subprocess
import sys

import pytest
import torch

from diffuapriel_hf.cli import main
from diffuapriel_hf.cli.generate import add_arguments, generation_settings

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny_model, word_tokenizer):
    path = tmp_path_factory.mktemp("model")
    model = tiny_model(kind="hybrid", sharpen=4.0)
    tokenizer = word_tokenizer(model.config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


def generate_command(capsys, *argv):
    code = main(["generate", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prompt_prints_what_generate_gives(saved_model, capsys):
    path, model, tokenizer = saved_model
    code, out, err = generate_command(
        capsys, "--model", path, "--prompt", "w3 w4 w5", "--max-new-tokens", 8, "--block-length", 4,
        "--temperature", 0.8, "--top-k", 10, "--seed", 3,
    )
    assert code == 0
    ids = tokenizer("w3 w4 w5", return_tensors="pt").input_ids
    expected = model.generate(
        ids, max_new_tokens=8, block_length=4, do_sample=True, temperature=0.8, top_k=10, seed=3
    )
    assert out.strip() == tokenizer.decode(expected[0], skip_special_tokens=True)
    assert out.startswith("w3 w4 w5")
    assert "denoising" in err  # the progress bar


def test_block_cache_flag(saved_model, capsys):
    path, model, tokenizer = saved_model
    code, out, err = generate_command(
        capsys, "--model", path, "--prompt", "w3 w4 w5", "--max-new-tokens", 8, "--block-length", 4, "--steps", 8,
        "--temperature", 0, "--block-cache",
    )
    assert code == 0
    assert "8/8" in err  # the progress bar counts the cached passes too
    ids = tokenizer("w3 w4 w5", return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=8, block_length=4, steps=8, do_sample=False, use_block_cache=True)
    assert out.strip() == tokenizer.decode(expected[0], skip_special_tokens=True)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert generation_settings(parser.parse_args(["--block-cache"]))["use_block_cache"] is True
    assert "use_block_cache" not in generation_settings(parser.parse_args([]))


def test_prompt_from_stdin_without_progress(saved_model, capsys, monkeypatch):
    path, model, tokenizer = saved_model
    monkeypatch.setattr("sys.stdin", io.StringIO("w7 w8\n"))
    code, out, err = generate_command(capsys, "--model", path, "--max-new-tokens", 4, "--no-progress")
    assert code == 0 and "denoising" not in err
    expected = model.generate(tokenizer("w7 w8", return_tensors="pt").input_ids, max_new_tokens=4)
    assert out.strip() == tokenizer.decode(expected[0], skip_special_tokens=True)


def test_infill_fills_the_placeholders_in_place(saved_model, capsys):
    path, model, tokenizer = saved_model
    code, out, _ = generate_command(
        capsys, "--model", path, "--infill", "w3 <blank> w4 w5 <blank>", "--mask-placeholder", "<blank>",
        "--infill-length", 2, "--remasking", "margin", "--no-progress",
    )
    assert code == 0
    ids = tokenizer("w3 [MASK] [MASK] w4 w5 [MASK] [MASK]", return_tensors="pt").input_ids
    expected = model.generate(ids, remasking="margin")
    assert out.strip() == tokenizer.decode(expected[0], skip_special_tokens=True)
    # Every placeholder filled, the given words in their places (the fill may be a special token, which the printed
    # text leaves out: a random model's choice).
    assert expected.shape == ids.shape and model.config.mask_token_id not in expected
    assert torch.equal(expected[0, [0, 3, 4]], ids[0, [0, 3, 4]])
    assert out.startswith("w3 ")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "{path}", "--prompt", "w3", "--max-new-tokens", 8, "--steps", 1, "--block-length", 4],
         r"`--steps` \(1\) is fewer than the blocks"),
        (["--model", "{path}", "--prompt", "w3", "--max-new-tokens", 4, "--temperature", -1], "`--temperature`"),
        (["--model", "{path}", "--infill", "w3 w4"], "placeholder"),
        (["--model", "{path}", "--infill", "w3 [MASK]", "--infill-length", 0], "--infill-length"),
        (["--model", "{path}/nothing-here", "--prompt", "w3"], "nothing-here': no such folder"),
    ],
)
def test_errors_are_clear(saved_model, capsys, argv, message):
    path = saved_model[0]
    with pytest.raises(SystemExit, match=message) as raised:
        main(["generate", *(str(a).format(path=path) for a in argv)])
    assert str(raised.value).startswith("diffuapriel generate: error:")


def test_a_model_without_a_tokenizer_asks_for_one(saved_model, tmp_path, capsys):
    _, model, tokenizer = saved_model
    model.save_pretrained(tmp_path / "bare")
    with pytest.raises(SystemExit, match="--tokenizer"):
        main(["generate", "--model", str(tmp_path / "bare"), "--prompt", "w3", "--max-new-tokens", "4"])
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    code, out, _ = generate_command(
        capsys, "--model", tmp_path / "bare", "--tokenizer", tmp_path / "tokenizer", "--prompt", "w3",
        "--max-new-tokens", 4, "--no-progress",
    )
    assert code == 0 and len(out.split()) >= 1


def test_the_model_generation_config_supplies_the_defaults(saved_model, tmp_path, capsys):
    _, model, tokenizer = saved_model
    defaults = dict(max_new_tokens=6, remasking="entropy", do_sample=True, temperature=0.9)
    model.generation_config.update(**defaults)
    try:
        model.save_pretrained(tmp_path)
    finally:
        model.generation_config.update(
            max_new_tokens=None, remasking="low_confidence", do_sample=None, temperature=None
        )
    tokenizer.save_pretrained(tmp_path)
    code, out, _ = generate_command(capsys, "--model", tmp_path, "--prompt", "w9", "--seed", 2, "--no-progress")
    expected = model.generate(torch.tensor([[9]]), seed=2, **defaults)
    assert code == 0 and out.strip() == tokenizer.decode(expected[0], skip_special_tokens=True)
    # --temperature 0 overrides the saved sampling with the most likely tokens.
    code, out, _ = generate_command(
        capsys, "--model", tmp_path, "--prompt", "w9", "--temperature", 0, "--seed", 2, "--no-progress"
    )
    expected = model.generate(torch.tensor([[9]]), max_new_tokens=6, remasking="entropy")
    assert code == 0 and out.strip() == tokenizer.decode(expected[0], skip_special_tokens=True)


def test_infill_ids_keep_the_tokenizer_special_tokens(saved_model, word_tokenizer):
    from tokenizers.processors import TemplateProcessing

    from diffuapriel_hf.cli.generate import infill_ids

    _, model, _ = saved_model
    tokenizer = word_tokenizer(model.config)
    bos, eos = model.config.bos_token_id, model.config.eos_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", bos), ("[EOS]", eos)]
    )
    mask = model.config.mask_token_id
    assert infill_ids(tokenizer, "w3 @ w4 @", "@", 2, mask) == [bos, 3, mask, mask, 4, mask, mask, eos]


def test_show_drafts_prints_the_text_through_the_diffusion_streamer(saved_model, capsys):
    path, model, tokenizer = saved_model
    code, out, _ = generate_command(capsys, "--model", path, "--prompt", "w3 w4", "--max-new-tokens", 8, "--seed", 1,
                                    "--show-drafts", "--no-progress")
    expected = model.generate(torch.tensor([[3, 4]]), max_new_tokens=8)
    final = tokenizer.decode(expected[0], skip_special_tokens=True)
    assert code == 0 and "\033" in out  # drafts drawn and cleared in place
    assert out.rstrip().endswith(final.split()[-1])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "no/such/folder/here", "--prompt", "w3"], r"--model 'no/such/folder/here': no such folder"),
        (["--model", "./typo-model", "--prompt", "w3"], r"--model './typo-model': no such folder"),
        (["--device", "cuda", "--prompt", "w3"], "--device cuda: .*no CUDA device"),
        (["--device", "nonsense", "--prompt", "w3"], "--device 'nonsense'"),
    ],
)
def test_unusable_model_paths_and_devices_get_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=message) as raised:
        main(["generate", *argv])
    assert "\n" not in str(raised.value)


def test_top_k_and_top_p_ask_for_sampling():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert generation_settings(parser.parse_args(["--top-k", "5"]))["do_sample"] is True
    assert generation_settings(parser.parse_args(["--top-p", "0.9", "--temperature", "0"]))["do_sample"] is False


@pytest.mark.parametrize("help_first", [False, True])
def test_help_shows_the_model_saved_defaults(saved_model, tmp_path, capsys, monkeypatch, help_first):
    _, model, tokenizer = saved_model
    model.generation_config.update(steps=12, block_length=4)
    try:
        model.save_pretrained(tmp_path)
    finally:
        model.generation_config.update(steps=None, block_length=None)
    # The help reads --model from the arguments given to the command, wherever --help stands, not from sys.argv.
    monkeypatch.setattr(sys, "argv", ["diffuapriel", "generate", "--help"])
    options = ["--help", "--model", str(tmp_path)] if help_first else ["--model", str(tmp_path), "--help"]
    with pytest.raises(SystemExit) as exited:
        main(["generate", *options])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "denoising steps in all (the model's: 12)" in text and "(the model's: 4)" in text
    assert "--steps must be at least the number of blocks" in text
    with pytest.raises(SystemExit):
        main(["generate", "--help"])  # the shipped model's defaults
    assert "denoising steps in all (the model's: 32)" in " ".join(capsys.readouterr().out.split())


def test_the_command_help_imports_no_torch():
    code = ("import sys, diffuapriel_command\n"
            "try:\n    diffuapriel_command.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "generate" in result.stdout


def test_no_progress_silences_every_bar(saved_model, capsys):
    path = saved_model[0]
    code, _, err = generate_command(capsys, "--model", path, "--prompt", "w3", "--max-new-tokens", 4, "--no-progress")
    assert code == 0 and err == ""
