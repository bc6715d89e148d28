"""lm-evaluation-harness: the model `diffuapriel` on in-memory requests (tiny models), and `diffuapriel eval` end to end
on the local tasks of tests/eval_tasks (multiple choice, perplexity, generation) with the shipped model, in one process
and in two (torchrun, as accelerate launch runs it on GPUs), offline."""

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_at_once

from diffuapriel_hf.evaluation.command import lm_eval_arguments

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from diffuapriel_hf.evaluation.harness import DiffuAprielLM, fit  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = Path(__file__).resolve().parent / "eval_tasks"
TASK_NAMES = "stdlib_next_line,stdlib_perplexity,stdlib_complete_line"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_model, word_tokenizer):
    """A tiny (sharpened) model and the word tokenizer, saved."""
    folder = tmp_path_factory.mktemp("tiny")
    model = tiny_model("hybrid", sharpen=6.0)
    model.save_pretrained(folder)
    tokenizer = word_tokenizer(model.config)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(folder)
    return folder


def requests(kind: str, arguments: list) -> list:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def test_the_model_is_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model("diffuapriel") is DiffuAprielLM


def test_loglikelihood_is_the_conditional_bound_of_each_request_alone(tiny_folder):
    lm = DiffuAprielLM(pretrained=str(tiny_folder), batch_size=3, num_samples=3, seed=2)
    pairs = [("w3 w4 w5", " w6 w7"), ("w10", " w11"), ("w20 w21 w22 w23", " w24 w25 w26"), ("", "w30 w31")]
    scores = lm.loglikelihood(requests("loglikelihood", pairs))
    for (context, continuation), (logprob, is_greedy) in zip(pairs, scores):
        context_ids = lm.tok_encode(context) if context else [lm.prefix_token_id]
        ids = torch.tensor([context_ids + lm.tok_encode(continuation.strip())])
        prompt_mask = torch.zeros_like(ids, dtype=torch.bool)
        prompt_mask[0, : len(context_ids)] = True
        alone = lm.model.compute_conditional_elbo(ids, prompt_mask, num_samples=3, seed=2)
        assert logprob == pytest.approx(-float(alone.nats), rel=1e-5)
        assert isinstance(is_greedy, bool)


def test_is_greedy_holds_for_what_greedy_decoding_writes(tiny_folder):
    lm = DiffuAprielLM(pretrained=str(tiny_folder), batch_size=2, num_samples=1)
    prompt = lm.tok_encode("w5 w6 w7 w8")
    written = lm.model.generate(torch.tensor([prompt]), max_new_tokens=3, steps=3, block_length=3,
                                eos_token_id=None)[0, len(prompt):]
    text = " " + lm.tokenizer.decode(written)
    other = " " + lm.tokenizer.decode([3 if int(written[0]) != 3 else 4, *written[1:].tolist()])
    results = lm.loglikelihood(requests("loglikelihood", [("w5 w6 w7 w8", text), ("w5 w6 w7 w8", other)]))
    assert [is_greedy for _, is_greedy in results] == [True, False]
    assert not DiffuAprielLM(pretrained=str(tiny_folder), check_greedy=False).loglikelihood(
        requests("loglikelihood", [("w5 w6 w7 w8", text)]))[0][1]


def test_loglikelihood_rolling_is_compute_elbo_of_each_window(tiny_folder):
    lm = DiffuAprielLM(pretrained=str(tiny_folder), batch_size=2, num_samples=4, seed=1, max_length=6)
    documents = [" ".join(f"w{i}" for i in range(10, 24)), "w40 w41 w42"]
    totals = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(doc,) for doc in documents]))
    for document, total in zip(documents, totals):
        tokens = lm.tok_encode(document)
        windows = [torch.tensor([tokens[i : i + 6]]) for i in range(0, len(tokens), 6)]  # 6 + 6 + 2 tokens, or 3
        expected = -sum(float(lm.model.compute_elbo(window, num_samples=4, seed=1)) for window in windows)
        assert total == pytest.approx(expected, rel=1e-5)


def test_generate_until_cuts_at_the_stop_strings_and_honours_the_lengths():
    lm = DiffuAprielLM(batch_size=2, block_length=4)  # the shipped model: its tokenizer gives stop strings their tokens
    contexts = ["def add(a, b):\n", "class Point:\n    def __init__(self"]
    free = lm.generate_until(requests("generate_until", [(c, {"until": ["<|endoftext|>"], "max_gen_toks": 8})
                                                         for c in contexts]))
    for context, text in zip(contexts, free):
        ids = torch.tensor([lm.tok_encode(context)])
        expected = lm.model.generate(ids, max_new_tokens=8, block_length=4, steps=None, seed=0)[0, ids.shape[1]:]
        assert text == lm.tokenizer.decode(expected, skip_special_tokens=True)
        assert len(lm.tok_encode(text)) <= 8
    stop = free[0].strip()[:2]  # the first characters written: the text ends before them
    cut = lm.generate_until(requests("generate_until", [(contexts[0], {"until": [stop], "max_gen_toks": 8})]))[0]
    assert cut == free[0].split(stop)[0] and stop not in cut


def test_bad_model_arguments_are_refused_by_name(tiny_folder):
    with pytest.raises(ValueError, match="batch_size"):
        DiffuAprielLM(pretrained=str(tiny_folder), batch_size="auto")
    with pytest.raises(ValueError, match="not_a_setting"):
        DiffuAprielLM(pretrained=str(tiny_folder), not_a_setting=3)
    with pytest.raises(ValueError, match="dtype"):
        DiffuAprielLM(pretrained=str(tiny_folder), dtype="float8")


def test_fit_keeps_the_continuation_and_the_last_of_the_context():
    assert fit([1, 2, 3, 4], [5, 6], 4) == ([3, 4], [5, 6])
    assert fit([1, 2], [5, 6, 7, 8, 9], 4) == ([], [6, 7, 8, 9])
    assert fit([1, 2], [5], 8) == ([1, 2], [5])


def test_lm_eval_arguments_name_the_model_and_pass_the_rest_on():
    assert lm_eval_arguments("my-model", ["--tasks", "x", "--model_args", "num_samples=4", "--limit", "2"]) == [
        "run", "--model", "diffuapriel", "--model_args", "pretrained=my-model,num_samples=4", "--tasks", "x",
        "--limit", "2"]
    assert lm_eval_arguments(None, ["--tasks", "x"]) == ["run", "--model", "diffuapriel", "--tasks", "x"]
    with pytest.raises(ValueError, match="both name the model"):
        lm_eval_arguments("a", ["--model_args", "pretrained=b"])


def torch_threads(threads: int) -> dict:
    """The environment variables that give each process of a command `threads` torch threads."""
    return dict(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads))


def eval_command(output: Path) -> list:
    return ["-m", "diffuapriel_command", "eval", "--tasks", TASK_NAMES, "--include_path", str(TASKS),
            "--model_args", "num_samples=4", "--batch_size", "16", "--log_samples", "--output_path", str(output)]


def read_results(output: Path) -> tuple[dict, dict]:
    """(the results of each task, the logged samples of each task) that lm-eval wrote under `output`."""
    results = json.loads(next(output.rglob("results_*.json")).read_text())["results"]
    samples = {path.name.split("_", 1)[1].rsplit("_", 1)[0]: [json.loads(line) for line in path.open()]
               for path in output.rglob("samples_*.jsonl")}
    return results, samples


@pytest.fixture(scope="module")
def eval_runs(tmp_path_factory) -> dict:
    """`diffuapriel eval` of the shipped model run twice at once: on the three local tasks in one process ("one"), and
    on two of them, their first 6 documents, in two (torchrun, as accelerate launch runs it on GPUs: "two"). While
    the one process starts (imports, lm-eval's index of its tasks) on one of CI's two cores, the two use the other;
    then it may have both (twice as fast, the same scores). Each run's (completed process, output folder)."""
    folder = tmp_path_factory.mktemp("eval")
    one, two = folder / "one", folder / "two"
    one.mkdir(), two.mkdir()
    command = eval_command(two / "out")
    command[command.index("--tasks") + 1] = "stdlib_next_line,stdlib_perplexity"
    two_processes, one_process = run_at_once(
        ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531", *command,
          "--limit", "6"], two, torch_threads(1)),
        ([sys.executable, *eval_command(one / "out")], one, torch_threads(2)))
    return dict(one=(one_process, one / "out"), two=(two_processes, two / "out"))


@pytest.fixture(scope="module")
def shipped_model_results(eval_runs):
    """The one process's (results of each task, logged samples of each task)."""
    result, output = eval_runs["one"]
    assert result.returncode == 0, result.stderr[-3000:]
    return read_results(output)


@pytest.mark.slow
def test_the_shipped_model_chooses_the_next_line_above_chance(shipped_model_results):
    results, samples = shipped_model_results
    assert len(samples["stdlib_next_line"]) == 16
    # Four choices: chance is 0.25; 8 of 16 or more happens by chance with probability 0.027.
    assert results["stdlib_next_line"]["acc,none"] >= 0.5


@pytest.mark.slow
def test_the_shipped_models_perplexity_beats_a_uniform_model(shipped_model_results, tmp_path):
    results, samples = shipped_model_results
    documents = [sample["doc"]["text"] for sample in samples["stdlib_perplexity"]]
    from transformers import AutoTokenizer

    from diffuapriel_hf import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    tokens = sum(len(tokenizer(text).input_ids) for text in documents)
    uniform_bits_per_byte = tokens * torch.log2(torch.tensor(4095.0)).item() / sum(len(t.encode()) for t in documents)
    assert 0 < results["stdlib_perplexity"]["bits_per_byte,none"] < uniform_bits_per_byte / 2


@pytest.mark.slow
def test_generations_stop_at_the_newline_within_the_task_length(shipped_model_results):
    results, samples = shipped_model_results
    from transformers import AutoTokenizer

    from diffuapriel_hf import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    texts = [sample["resps"][0][0] for sample in samples["stdlib_complete_line"]]
    assert len(texts) == 6 and "exact_match,none" in results["stdlib_complete_line"]
    assert all("\n" not in text and len(tokenizer(text).input_ids) <= 16 for text in texts)


def flat(responses) -> list:
    """A logged sample's responses (nested lists of strings) as one list: numbers as floats, the rest as written."""
    if isinstance(responses, list):
        return [value for item in responses for value in flat(item)]
    try:
        return [float(responses)]
    except ValueError:
        return [responses]


@pytest.mark.slow
def test_two_processes_give_the_scores_of_one(eval_runs, shipped_model_results):
    result, output = eval_runs["two"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on rank 1" in result.stderr  # lm-eval gave the second process its share
    _, two = read_results(output)
    _, one = shipped_model_results
    for task, samples in two.items():
        alone = {sample["doc_id"]: flat(sample["resps"]) for sample in one[task]}
        assert len(samples) == min(6, len(one[task]))
        for sample in samples:  # every request's score (and is_greedy), as one process gave it
            for value, expected in zip(flat(sample["resps"]), alone[sample["doc_id"]], strict=True):
                assert value == (expected if isinstance(expected, str) else pytest.approx(expected, rel=1e-5))


def test_the_package_imports_without_lm_eval_and_the_command_says_what_to_install(tmp_path):
    blocked = ("import sys; sys.modules['lm_eval'] = None; import diffuapriel_hf; "
               "from diffuapriel_command import main; sys.exit(main(['eval', '--tasks', 'x']))")
    result, = run_at_once(([sys.executable, "-c", blocked], tmp_path, torch_threads(1)))
    assert result.returncode == 2 and "diffuapriel-hf[eval]" in result.stderr


def test_other_commands_still_refuse_options_they_do_not_know(capsys):
    from diffuapriel_command import main

    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--tasks", "x"])
    assert exit_.value.code == 2 and "unrecognized arguments: --tasks x" in capsys.readouterr().err
