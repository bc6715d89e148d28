"""The benchmark scripts as infrastructure, checked without a GPU: each imports and answers `--help`, each stamps its
results through benchmarks/harness.py, and the harness stamps and writes them as it says."""

import importlib.util
import json
import subprocess
import sys
import time
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.rglob("*.py"))
SHELL_SCRIPTS = sorted(BENCHMARKS.rglob("*.sh"))


@pytest.fixture
def benchmarks_on_path(monkeypatch):
    """The scripts import each other by name from their folder, as `python benchmarks/x.py` lets them."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def harness(benchmarks_on_path):
    return load(BENCHMARKS / "harness.py")


def test_there_are_scripts():
    assert len(SCRIPTS) > 10 and len(SHELL_SCRIPTS) >= 2


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda path: str(path.relative_to(BENCHMARKS)))
def test_script_imports_and_answers_help_without_a_gpu(path, benchmarks_on_path, monkeypatch, capsys):
    module = load(path)
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("path", [p for p in SCRIPTS if p.name != "harness.py"] + SHELL_SCRIPTS,
                         ids=lambda path: str(path.relative_to(BENCHMARKS)))
def test_script_stamps_its_results_through_the_harness(path):
    source = path.read_text()
    # A script writes through save() (itself, through the harness's rows_of_each_model, or an evaluation script it
    # runs does), or stamps another tool's output.
    writes = "save(" in source or "rows_of_each_model(" in source
    uses = ("from harness import" in source and "new_result" in source and writes) or (
        "benchmarks/harness.py stamp" in source) or ("benchmarks/default_model/evaluate.py" in source)
    assert uses, (f"{path.name} writes results without the harness's stamp: build the result with "
                  "`harness.new_result(...)` and write it with `harness.save(result, args.out)` "
                  "(benchmarks/harness.py)")


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=lambda path: path.name)
def test_shell_script_parses(path):
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_wall_seconds_times_each_call_after_the_warm_up(harness):
    calls = []
    seconds = harness.wall_seconds(lambda: calls.append(time.sleep(0.01)), reps=3, warmup=2)
    assert len(calls) == 5 and len(seconds) == 3
    assert all(0.01 <= s < 1 for s in seconds)


def test_stamp_names_commit_device_and_versions(harness):
    stamp = harness.environment()
    assert set(stamp["versions"]) == {"python", "torch", "transformers", "triton", "mamba-ssm", "causal-conv1d"}
    assert stamp["versions"]["torch"] is not None and stamp["device"]
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert stamp["commit"] == head.strip() and isinstance(stamp["dirty"], bool)


def test_stamp_says_whether_mamba_ssm_ran_deterministically(harness, monkeypatch):
    monkeypatch.setenv("MAMBA_DETERMINISTIC", "1")
    stamp = harness.environment()
    assert stamp["mamba_deterministic"] is True
    assert harness.stamp_line(dict(environment=stamp)).endswith("; mamba-ssm deterministic (fixed launch settings).")
    monkeypatch.setenv("MAMBA_DETERMINISTIC", "0")
    stamp = harness.environment()
    assert stamp["mamba_deterministic"] is False and "deterministic" not in harness.stamp_line(dict(environment=stamp))


def test_stamp_outside_a_git_checkout_reads_the_commit_variable(harness, tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "ROOT", tmp_path)  # no repository there
    monkeypatch.delenv(harness.COMMIT_VARIABLE, raising=False)
    with pytest.raises(RuntimeError, match=harness.COMMIT_VARIABLE):
        harness.source_revision()
    monkeypatch.setenv(harness.COMMIT_VARIABLE, "0123abcd")
    assert harness.source_revision() == dict(commit="0123abcd", dirty=None, commit_from=harness.COMMIT_VARIABLE)


def test_save_writes_stamped_json_and_markdown(harness, tmp_path):
    result = harness.new_result(rows=[1, 2])
    path = harness.save(result, tmp_path / "block_cache_gpu_1.3b", markdown="| a |\n|---|\n| 1 |")
    assert path == tmp_path / "block_cache_gpu_1.3b.json"
    assert json.loads(path.read_text()) == result
    markdown = (tmp_path / "block_cache_gpu_1.3b.md").read_text()
    assert markdown.startswith("| a |") and f"commit {result['environment']['commit'][:12]}" in markdown
    assert harness.save(result, tmp_path / "x.json") == tmp_path / "x.json"
    with pytest.raises(ValueError, match="new_result"):
        harness.save(dict(rows=[]), tmp_path / "unstamped")


def test_stamp_command_stamps_another_tools_json_once(harness, tmp_path):
    path = tmp_path / "train_results.json"
    path.write_text(json.dumps(dict(train_loss=1.5)))
    assert harness.main(["stamp", str(path)]) == 0
    stamped = json.loads(path.read_text())
    assert stamped["train_loss"] == 1.5 and "commit" in stamped["environment"]
    with pytest.raises(ValueError, match="unstamped"):
        harness.main(["stamp", str(path)])


def throughput_result(harness) -> dict:
    """A small stamped result of throughput.py's layout: two models at batch 1 x 64K."""
    def row(step_ms):
        return dict(batch=1, length=65536, tokens=65536, eager_step_ms=step_ms, graphed_step_ms=step_ms + 1,
                    generate_tokens_per_s=1000 / step_ms, peak_memory_gib=5.0, attention_backend="none")

    result = harness.new_result(peak_bf16_flops=989.4e12, graph_max_tokens=16384, matmul_ceiling_flops=7e14,
                                generate_steps=8, prompt_length=64, tokens_per_batch=16384, models={})
    for name, parameters, step_ms in (("diffuapriel-1.3b", 1.39e9, 380.0), ("diffutran-1.3b", 1.34e9, 1770.0)):
        result["models"][name] = dict(parameters=parameters, rows=[row(step_ms)])
    return result


def test_throughput_table_from_saved_results(harness, benchmarks_on_path):
    throughput = load(BENCHMARKS / "throughput.py")
    result = throughput_result(harness)
    for name in result["models"]:
        for row in result["models"][name]["rows"]:
            throughput.add_step_rates(row, result["models"][name]["parameters"], result["peak_bf16_flops"])
    table = throughput.markdown(result)
    assert "| diffuapriel-1.3b | 1 x 65536 | 380.00 | 381.00 | 4.66x |" in table
    assert "step throughput at 64K = 4.66x DiffuTran (target >= 4.4x): met" in table


def test_throughput_refuses_to_render_unstamped_results(benchmarks_on_path, tmp_path, monkeypatch, capsys):
    throughput = load(BENCHMARKS / "throughput.py")
    saved = tmp_path / "old.json"
    saved.write_text(json.dumps(dict(device="NVIDIA H200", models={})))
    monkeypatch.setattr(sys, "argv", ["throughput.py", "--render", str(saved)])
    with pytest.raises(SystemExit):
        throughput.main()
    assert "before results were stamped" in capsys.readouterr().err


def index_rows() -> list[list[str]]:
    """The cells of benchmarks/README.md's index table, one list per row (question, script, results, decision, sets)."""
    table = (BENCHMARKS / "README.md").read_text().split("## Index", 1)[1].split("\n\n")[1]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in table.splitlines()[2:]]


def backticked(cell: str) -> list[str]:
    return [name for name in cell.split("`")[1::2] if not name.startswith(".")]  # `.md`: the same stem


def test_index_names_every_script_and_only_real_ones():
    rows = index_rows()
    assert rows and all(len(row) == 5 for row in rows)
    named = {name for row in rows for name in backticked(row[1]) if name.endswith((".py", ".sh"))}
    assert all((BENCHMARKS / name).exists() for name in named), sorted(named)
    scripts = {str(path.relative_to(BENCHMARKS)) for path in SCRIPTS + SHELL_SCRIPTS} - {"harness.py"}
    assert scripts <= named, (f"benchmark scripts missing from benchmarks/README.md's index (add a row: question, "
                              f"script, results, decision, what it sets): {sorted(scripts - named)}")


def test_index_names_real_results_and_every_result_is_indexed():
    results = BENCHMARKS / "results"
    for row in index_rows():
        for name in backticked(row[2]):
            assert list(results.glob(name)) or (BENCHMARKS / name).exists(), f"no result file {name}"
    text = (BENCHMARKS / "README.md").read_text()
    unindexed = [path.name for path in results.iterdir() if path.is_file() and path.stem not in text]
    assert not unindexed, f"results not in benchmarks/README.md (index them, or archive them): {unindexed}"
    archive = (results / "archive" / "README.md").read_text()
    unnoted = [path.name for path in (results / "archive").glob("*.json") if f"`{path.name}`" not in archive]
    assert not unnoted, f"archived results without a note in results/archive/README.md: {unnoted}"


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the repository's git history")
def test_compare_commits_imports_a_commits_runtime_beside_the_installed_one(benchmarks_on_path, tmp_path):
    compare = load(BENCHMARKS / "compare_commits.py")
    folder = compare.extract_runtime("HEAD", tmp_path)
    runtime = compare.import_runtime(folder, "runtime_at_head")
    configuration = importlib.import_module("runtime_at_head.configuration_diffuapriel")
    assert configuration.__file__.startswith(str(tmp_path))
    config = configuration.DiffuAprielConfig.from_preset("tiny")
    assert type(config).__module__ == "runtime_at_head.configuration_diffuapriel" and runtime.__path__ == [str(folder)]
    for name in [name for name in sys.modules if name.split(".")[0] == "runtime_at_head"]:
        del sys.modules[name]


def test_compare_commits_training_mode_times_each_runtimes_training_step_and_keeps_its_loss(
        benchmarks_on_path, tiny_model, monkeypatch):
    compare = load(BENCHMARKS / "compare_commits.py")
    calls = []

    def cpu_median_ms(fn, reps, warmup=1):  # CUDA events stand-in: runs the step as often, returns its count
        for _ in range(warmup + reps):
            fn()
        calls.append(warmup + reps)
        return float(len(calls))

    monkeypatch.setattr(compare, "median_ms", cpu_median_ms)
    models = dict(current=tiny_model("mamba", block_size=4), baseline=tiny_model("mamba", block_size=4))
    result = dict(step_ms={})
    args = SimpleNamespace(training=True)
    losses = compare.measure_round(args, None, models, torch.zeros(2, 12, dtype=torch.long), result)
    assert calls == [4, 4]
    assert result["step_ms"] == {"2 x 12: current, training": [1.0], "2 x 12: baseline, training": [2.0]}
    assert losses["current"] == losses["baseline"] > 0  # the same weights and tokens
    assert all(model.training for model in models.values())


def test_packed_training_steps_take_a_full_batch_of_documents_also_where_the_corpus_wraps_around(benchmarks_on_path):
    packed = load(BENCHMARKS / "packed_training.py")
    documents = [[i] for i in range(5)]
    assert packed.step_documents(documents, 0, 2) == [[0], [1]]
    assert packed.step_documents(documents, 2, 2) == [[4], [0]]  # a step that would have held one document
    assert packed.step_documents(documents, 3, 4) == [[2], [3], [4], [0]]


def test_rows_of_each_model_saves_every_row_as_it_comes_and_frees_each_model_first(harness, tmp_path):
    class Model:
        pass

    built, saved = [], []

    def build_model(name):
        assert all(reference() is None for reference in built)  # the model before it already freed
        model = Model()
        built.append(weakref.ref(model))
        return model

    def rows(model, name):
        for index in range(2):
            yield dict(model=name, index=index)
            saved.append(json.loads((tmp_path / "out.json").read_text())["rows"])

    result = harness.new_result(rows=[])
    harness.rows_of_each_model(result, tmp_path / "out", ["a", "b"], build_model, rows,
                               lambda result: f"{len(result['rows'])} rows")
    assert [len(rows) for rows in saved] == [1, 2, 3, 4] and saved[-1][-1] == dict(model="b", index=1)
    assert (tmp_path / "out.md").read_text().startswith("4 rows\n")


def test_block_quality_reads_the_training_progress_bar_not_the_tokenizers(benchmarks_on_path, tmp_path):
    quality = load(BENCHMARKS / "block_quality.py")
    run = quality.Run("diffuapriel-8m", 4, tmp_path, max_steps=1800)
    run.log.write_text("tokenizing: 100%|##########| 499/499 [00:01<00:00, 310.2 examples/s]\n")
    assert quality.progress(run) == (0, 1800)
    run.log.write_text(run.log.read_text() + "  0%|          | 0/1800 [00:00<?, ?it/s]\r"
                       " 12%|#         | 217/1800 [00:31<03:40,  7.18it/s]\r 12%|#  | 218/1800 [00:31<03:40,  1.01s/it]\n"
                       "Writing model shards: 100%|##########| 1/1 [00:00<00:00, 17.84it/s]\n")
    assert quality.progress(run) == (218, 1800)
    (run.dir / "checkpoint-200").mkdir(parents=True)
    assert quality.step_reached(run) == 218


class RecordedProcess:
    def __init__(self):
        self.signals = []

    def send_signal(self, number):
        self.signals.append(number)


def test_block_quality_pauses_the_other_runs_while_a_diffuapriel_run_would_miss_the_deadline(
    benchmarks_on_path, tmp_path, monkeypatch
):
    quality = load(BENCHMARKS / "block_quality.py")
    runs = [quality.Run(preset, block_size, tmp_path, max_steps=1800) for preset, block_size in quality.RUNS]
    for run in runs:
        run.status, run.process = "training", RecordedProcess()
    clock, steps = [1000.0], {run.name: 0 for run in runs}
    monkeypatch.setattr(quality.time, "time", lambda: clock[0])
    monkeypatch.setattr(quality, "progress", lambda run: (steps[run.name], 1800))
    priority = quality.Priority(runs, deadline=1000.0 + 450)
    by_name = {run.name: run for run in runs}
    apriel4, apriel16, apriel32 = (by_name[quality.run_name("diffuapriel-8m", size)] for size in (4, 16, 32))
    tran = by_name[quality.run_name("diffutran-8m", 4)]

    def half_minute(rate4: float, rate: float):  # steps a second of the block-4 DiffuApriel run and of the others
        clock[0] += 30
        for run in priority.first:
            steps[run.name] += int(30 * (rate4 if run is apriel4 else rate))
        priority.update()

    half_minute(0, 0)
    # block 4: 1,785 steps left at 0.5 a second, 3,570 s: hopeless, whatever the others do; blocks 16 and 32: 1,710
    # left at 3 a second, 570 s, past the deadline (390 s away) but within twice the time left: the others make room.
    half_minute(0.5, 3)
    assert priority.paused == priority.others and tran.process.signals == [quality.signal.SIGSTOP]
    assert apriel32.process.signals == []
    half_minute(0.5, 10)  # 1,410 left at 10 a second: ends 219 s before the deadline
    assert priority.paused == [] and tran.process.signals == [quality.signal.SIGSTOP, quality.signal.SIGCONT]
    apriel16.status = apriel32.status = "scored"
    half_minute(0.5, 0)  # only the hopeless run is left: nothing is paused for it
    assert priority.paused == [] and tran.process.signals == [quality.signal.SIGSTOP, quality.signal.SIGCONT]


def test_a_variant_sharing_the_models_weights_gives_generate_the_same_tokens(benchmarks_on_path, harness, tiny_model):
    # window_logits.py's "every position" variant: a subclass of the model, holding the model's own tensors.
    window_logits = load(BENCHMARKS / "window_logits.py")
    model = tiny_model("hybrid")
    twin = harness.sharing_weights(model, window_logits.EveryPositionLogits)
    assert type(twin) is window_logits.EveryPositionLogits and not twin.training
    assert all(a is b or a.data_ptr() == b.data_ptr() for a, b in zip(model.parameters(), twin.parameters()))
    ids = torch.randint(3, model.config.mask_token_id, (2, 10), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([2, 5, 6])
    # Every position's logits then a selection, against the selected rows' product: equal up to the matrix product's
    # summation order, which depends on the number of rows and threads.
    torch.testing.assert_close(twin(ids, logits_to_keep=positions).logits, model(ids, logits_to_keep=positions).logits,
                               rtol=1e-6, atol=1e-6)
    assert torch.equal(twin.generate(ids, max_new_tokens=8, block_length=4),
                       model.generate(ids, max_new_tokens=8, block_length=4))


def test_the_commit_variable_wins_over_a_git_checkout_around_the_copy(harness, monkeypatch):
    # A GPU machine's copy of the tree may lie inside another checkout, whose git would name the wrong commit.
    monkeypatch.setenv(harness.COMMIT_VARIABLE, "0123abcd")
    assert harness.source_revision() == dict(commit="0123abcd", dirty=None, commit_from=harness.COMMIT_VARIABLE)


def test_profile_steps_busy_time_is_the_union_of_the_kernel_intervals(benchmarks_on_path):
    busy_ms = load(BENCHMARKS / "profile_step.py").busy_ms
    # Overlapping, nested, touching and separate intervals, given out of order (us): 1,000-1,500 idle.
    intervals = [(2000, 2500), (0, 600), (400, 1000), (100, 200), (2500, 3000)]
    assert busy_ms(intervals) == (3.0, 2.0)
    assert busy_ms([]) == (0.0, 0.0)


def test_profile_steps_longest_waits_name_the_kernels_on_either_side(benchmarks_on_path):
    idle_gaps = load(BENCHMARKS / "profile_step.py").idle_gaps
    kernels = [(0.0, 1000.0, "a"), (200.0, 3000.0, "long"), (1500.0, 2000.0, "inside"), (3500.0, 4000.0, "b"),
               (5000.0, 5100.0, "c")]
    gaps = idle_gaps(kernels, 5)
    assert gaps == [dict(ms=1.0, at_ms=4.0, after="b", before="c"), dict(ms=0.5, at_ms=3.0, after="long", before="b")]
    assert idle_gaps(kernels, 1) == gaps[:1]
    assert idle_gaps([], 3) == []


def test_profile_steps_training_step_runs_the_loss_backward_and_leaves_no_gradient(benchmarks_on_path, tiny_model):
    profile_step = load(BENCHMARKS / "profile_step.py")
    model = tiny_model("hybrid")
    gradients = []  # the embedding's, as the backward computes it
    model.get_input_embeddings().weight.register_hook(gradients.append)
    profile_step.training_step(model, batch=2, length=12)()
    assert model.training and len(gradients) == 1 and gradients[0].abs().sum() > 0
    assert all(parameter.grad is None for parameter in model.parameters())


def test_training_fusions_step_repeats_one_loss_and_its_table_compares_the_variants(benchmarks_on_path, tiny_model):
    fusions = load(BENCHMARKS / "training_fusions.py")
    model = tiny_model("mamba").train()
    assert set(fusions.variants(model)) == {"default", "residual norm unfused", "SwiGLU unfused", "mixer step by step",
                                            "mamba-ssm's mixer function", "reading orders unfused", "token nll fused"}
    attention_variants = {"default", "residual norm unfused", "SwiGLU unfused", "rotary unfused", "token nll fused"}
    assert set(fusions.variants(tiny_model("attention"))) == attention_variants
    assert "SwiGLU unfused" not in fusions.variants(tiny_model("attention", intermediate_size=0))  # no MLP
    losses = []
    step = fusions.training_step(model, batch=2, length=12, losses=losses)
    step()
    step()
    assert len(losses) == 2 and losses[0] == losses[1] and losses[0] > 0
    assert all(parameter.grad is None for parameter in model.parameters())
    variants = {"default": dict(step_ms=100.0, peak_gib=1.0, loss=2.0),
                "mixer step by step": dict(step_ms=110.0, peak_gib=1.5, loss=2.0)}
    table = fusions.markdown(dict(rows=[dict(model="m", batch=4, length=4096, variants=variants)]))
    assert "| m | 4 x 4,096 | 100.0 (1.000x), 1.0, 2.00000 | 110.0 (1.100x), 1.5, 2.00000 |" in table
    with pytest.raises(ValueError, match="no variants \\['state passing dense'\\]"):  # a block model's, not this one's
        fusions.measure(model, batch=2, length=12, rounds=1, names=["state passing dense"])


def test_block_quality_table_puts_each_full_sequence_model_above_its_block_variants(benchmarks_on_path, tmp_path):
    quality = load(BENCHMARKS / "block_quality.py")
    shipped = str(quality.SHIPPED)

    def run(preset, block_size, bits):
        return dict(preset=preset, block_size=block_size, training_wall_s=100.0,
                    heldout_float32={"bits_per_token": bits})

    runs = {"diffutran-8m-block16": run("diffutran-8m", 16, 5.5),
            "diffuapriel-8m-block16": run("diffuapriel-8m", 16, 5.6), "diffutran-8m": run("diffutran-8m", None, 6.2)}
    trained = dict(environment=quality.new_result()["environment"], shipped_heldout={shipped: {"bits_per_token": 5.8}},
                   runs=runs)
    (tmp_path / "trained.json").write_text(json.dumps(trained))
    parsed = dict(environment={}, models={
        shipped: dict(test_prompts=dict(parsed=4, prompts=8), heldout_headers=dict(parsed=57, prompts=118)),
        "/tmp/runs/diffuapriel-8m-block16-bf16": dict(test_prompts=dict(parsed=3, prompts=8),
                                                      heldout_headers=dict(parsed=42, prompts=118))})
    (tmp_path / "parsed.json").write_text(json.dumps(parsed))
    quality.main(["table", str(tmp_path / "trained.json"), "--parse", str(tmp_path / "parsed.json"),
                  "--note", "a note", "--to", str(tmp_path / "table")])
    rows = [line for line in (tmp_path / "table.md").read_text().splitlines() if line.startswith("| `")]
    assert [row.split(" | ")[1] for row in rows] == ["full sequence", "blocks of 16", "full sequence", "blocks of 16"]
    assert rows[0].startswith("| `diffuapriel-8m` (shipped) | full sequence | 5.800 | 4/8 | 57/118 | 48.4% |")
    assert "| 5.600 | 3/8 | 42/118 | 35.7% | 100 s |" in rows[1] and "| 6.200 |  |  |  | 100 s |" in rows[2]
    assert "- a note" in (tmp_path / "table.md").read_text()
    assert json.loads((tmp_path / "table.json").read_text())["parse"]["diffuapriel-8m-block16"]["test_prompts"]


def test_token_nll_table_gives_each_implementations_time_against_the_reference(benchmarks_on_path):
    table = load(BENCHMARKS / "token_nll.py").markdown(dict(
        rows=8192, vocab=50258, padded=50264, nll_max_diff=1e-6, grad_max_diff=2e-3, grad_max=0.9,
        reference=dict(ms=8.0, peak_gib=4.5), kernels=dict(ms=1.0, peak_gib=0.8)))
    assert "| diffusion.token_nll | 8.000 | 1.00 | 4.50 |" in table
    assert "| loss_triton.token_nll | 1.000 | 0.12 | 0.80 |" in table
    assert "-log p 1e-06, the gradient 0.002 (its largest value 0.9)" in table
