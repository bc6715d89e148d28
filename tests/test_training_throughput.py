"""benchmarks/training_throughput.py on the CPU: its --smoke run measures every model, length and checkpointing mode
and the Trainer comparison, and writes the stamped table; a deadline stops it cleanly with what it has; `report`
copies a run's results."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def script(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports harness from beside it
    spec = importlib.util.spec_from_file_location("training_throughput", BENCHMARKS / "training_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_measures_every_model_length_and_mode_and_reports(script, tmp_path):
    script.main(["run", str(tmp_path / "run"), "--smoke"])
    result = json.loads((tmp_path / "run" / "training_throughput.json").read_text())
    lengths = script.SMOKE["lengths"]
    assert list(result["models"]) == list(script.SMOKE_MODELS) and result["environment"]["commit"]
    for name, entry in result["models"].items():
        rows = {(row["checkpointing"], row["length"]): row for row in entry["rows"]}
        assert sorted(rows) == sorted((mode, length) for mode in (False, True) for length in lengths)
        for row in rows.values():
            assert row["batch"] * row["length"] == script.SMOKE["tokens_per_step"]
            assert len(row["step_seconds"]) == script.SMOKE["reps"] and row["step_ms"] > 0
            assert row["tokens_per_s"] == pytest.approx(row["tokens"] / (row["step_ms"] / 1e3))
            assert row["mfu"] is None and 0 < row["mfu_of_ceiling"]  # no datasheet peak for a CPU
        trainer = entry["trainer"]
        assert len(trainer["trainer_step_seconds"]) == script.SMOKE["trainer_steps"] - 1
        assert trainer["trainer_step_ms"] > 0 and trainer["bare_with_mask_ms"] > 0
        # As many bare steps over changing batches as the Trainer's intervals; no allocator to watch on the CPU.
        assert len(trainer["bare_changing_seconds"]) == len(trainer["trainer_step_seconds"])
        assert trainer["trainer_alloc_retries"] is None and trainer["bare_changing_peak_reserved_gib"] is None
        every = entry["every_position_logits"]
        assert every["length"] == script.SMOKE["trainer_length"] and every["step_ms"] > 0
    table = (tmp_path / "run" / "training_throughput.md").read_text()
    assert "| tiny-attention | off | 2 x 32 |" in table and "1.00x" in table  # the baseline against itself
    assert "## Trainer against the bare step" in table and "tiny Trainer step" in table
    assert "## The loss from the labelled positions' logits" in table
    assert "Measured " in table.splitlines()[-1]  # the harness's stamp

    script.main(["report", str(tmp_path / "run" / "training_throughput.json"), "--to", str(tmp_path / "copy")])
    assert json.loads((tmp_path / "copy.json").read_text()) == result
    assert (tmp_path / "copy.md").read_text() == table
    assert "- tiny, checkpointing tokens/s against tiny-attention: 16: " in table  # targets in both modes

    script.main(["report", str(tmp_path / "run" / "training_throughput.json"), "--to", str(tmp_path / "noted"),
                 "--note", "the first rows ran beside other work on the GPU"])
    assert json.loads((tmp_path / "noted.json").read_text())["notes"] == ["the first rows ran beside other work on "
                                                                          "the GPU"]
    assert "## Notes\n\n- the first rows ran beside other work on the GPU\n" in (tmp_path / "noted.md").read_text()


def test_a_step_out_of_memory_is_retried_with_half_the_sequences(script, monkeypatch):
    """A length whose step does not fit is measured with half the batch, then half again, down to one sequence."""
    fits = 2

    def steps_that_fit(model, optimizer, batch, reps, device):
        if batch["input_ids"].shape[0] > fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [0.01] * reps

    monkeypatch.setattr(script, "timed_steps", steps_that_fit)
    model = script.build_model(script.SMOKE_MODELS["tiny"], torch.float32, torch.device("cpu"), 32)
    optimizer = torch.optim.AdamW(model.parameters())
    run = dict(tokens_per_step=256, reps=2, peak_bf16_flops=None, matmul_ceiling_flops=1e12)
    row = script.measure_length(model, optimizer, 32, run, torch.device("cpu"))
    assert (row["batch"], row["tokens"], row["step_ms"]) == (2, 64, 10.0) and "status" not in row
    fits = 0
    row = script.measure_length(model, optimizer, 32, run, torch.device("cpu"))
    assert row["status"] == "out of memory" and row["batch"] == 1 and "Tried to allocate" in row["error"]


def test_one_checkpointing_mode_measures_that_mode_alone(script, tmp_path):
    script.main(["run", str(tmp_path), "--smoke", "--models", "tiny", "--checkpointing", "off"])
    result = json.loads((tmp_path / "training_throughput.json").read_text())
    entry = result["models"]["tiny"]
    assert result["checkpointing"] == "off" and {row["checkpointing"] for row in entry["rows"]} == {False}
    assert entry["trainer"]["trainer_step_ms"] > 0  # the Trainer comparison takes the rows without checkpointing


def test_deadline_skips_what_would_end_after_it_and_saves(script, tmp_path):
    script.main(["run", str(tmp_path), "--smoke", "--deadline", "0"])
    result = json.loads((tmp_path / "training_throughput.json").read_text())
    assert all(entry == dict(status="skipped: deadline", rows=[]) for entry in result["models"].values())
    assert "| tiny | | | skipped: deadline |" in (tmp_path / "training_throughput.md").read_text()


def test_lengths_must_divide_the_tokens_of_a_step(script, tmp_path, capsys):
    with pytest.raises(SystemExit):
        script.main(["run", str(tmp_path), "--lengths", "1024", "3000", "--tokens_per_step", "32768"])
    assert "every length must divide --tokens_per_step" in capsys.readouterr().err
