"""Training throughput of DiffuApriel, DiffuApriel-H and DiffuTran (the 1.3B presets and their block diffusion
variants, random weights, bf16), all in one run on one GPU.

For each model, at each sequence length (1K to 32K tokens) with a fixed number of tokens a step (the batch is
tokens_per_step / length sequences), with and without gradient checkpointing:
- the time of one bare training step: forward with the loss, backward, AdamW step (fused on CUDA), zero_grad, on a
  batch from the train command's collator (`DataCollatorForMaskedDiffusion`: noised tokens, labels and loss weights;
  no attention mask, as nothing is padded); the median of `--reps` steps after a
  warm-up step of the shape, each step timed with the device synchronised at its ends;
- tokens per second; MFU = 6 x parameters x tokens / step time over the card's datasheet dense bf16 peak, and over
  a measured ceiling (an 8192^3 bf16 matrix product timed in the same run); peak memory of the timed steps.
A block model's step runs the noised and the clean stream together (twice the tokens through the stack); its MFU
counts the noised tokens only, as the others', so it says what a training token costs.
Then the same model through `transformers.Trainer` with the train command's collator and training defaults for a
few steps at one length (`--trainer_length`): the time between successive steps' ends (data loading, collation,
gradient clipping, the scheduler and logging included), against the bare step, the bare step given an attention
mask of ones (what the collator passed before it left such masks out; on CUDA a mask takes the padding path), and the
bare step over as many different batches as the Trainer's (a new noise each step, so a new number of labelled
positions: tensors of new sizes for the allocator), with the CUDA allocator's retries (cache flushes when an
allocation did not fit) and peak reserved memory of those and of the Trainer's steps. At that
length also the bare step with the loss from the logits of every position (`skip_logits=False`) against the default,
the labelled positions'.
Each model's kernels are compiled by a step of one short sequence before anything is timed. A length that runs out
of memory is recorded and the run goes on, as it does past a model that fails (its error recorded); `--deadline`
(seconds from the start) skips what would end after it, and the results so far are saved after every model. The
models run in order of importance (DiffuApriel and its baseline first, the block variants last).

    python benchmarks/training_throughput.py run OUT_DIR                     # GPU: OUT_DIR/training_throughput.*
    python benchmarks/training_throughput.py run OUT_DIR --checkpointing off # one mode (with the Trainer comparison)
    python benchmarks/training_throughput.py run OUT_DIR --smoke             # CPU, tiny models and lengths
    python benchmarks/training_throughput.py report OUT_DIR/training_throughput.json
        # its .md and .png rendered again, and all three copied into benchmarks/results/
"""

import argparse
import json
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from harness import RESULTS, device_name, matmul_ceiling, new_result, output_paths, peak_bf16, save

from diffuapriel_hf import DataCollatorForMaskedDiffusion, DiffuAprielForMaskedLM, preset_config
from diffuapriel_hf.training.train import FIXED_TRAINING_ARGUMENTS, TRAINING_DEFAULTS

# name -> (preset, config overrides, the DiffuTran model it is compared with), in the order they are measured.
MODELS = {
    "diffuapriel-1.3b": ("diffuapriel-1.3b", {}, "diffutran-1.3b"),
    "diffutran-1.3b": ("diffutran-1.3b", {}, "diffutran-1.3b"),
    "diffuapriel-h-1.3b": ("diffuapriel-h-1.3b", {}, "diffutran-1.3b"),
    "diffuapriel-1.3b-block": ("diffuapriel-1.3b-block", {}, "diffutran-1.3b-block"),
    "diffutran-1.3b-block": ("diffutran-1.3b-block", {}, "diffutran-1.3b-block"),
    "diffuapriel-h-1.3b-block": ("diffuapriel-h-1.3b-block", {}, "diffutran-1.3b-block"),
}
# A model starts only this long before the deadline: its build and warm-up take 10-20 s once the kernels are compiled.
MODEL_START_MARGIN = 45
LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768]
TOKENS_PER_STEP = 32768
# --smoke: the whole measurement on the CPU in seconds (the tiny preset as each stack).
SMOKE_MODELS = {
    "tiny": ("tiny", {}, "tiny-attention"),
    "tiny-attention": ("tiny", {"layer_types": ["full_attention"] * 2}, "tiny-attention"),
    "tiny-block": ("tiny", {"block_size": 8}, "tiny-block"),
}
# float32: a CPU's bf16 products are many times slower (the 1024^3 ceiling product alone took 10 s in bf16).
SMOKE = dict(lengths=[16, 32], tokens_per_step=64, trainer_length=32, trainer_steps=4, reps=2, device="cpu",
             dtype="float32")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Clock:
    """Seconds left before the deadline, and whether a piece of work expected to take `seconds` ends before it."""

    def __init__(self, deadline_seconds: float):
        self.end = time.perf_counter() + deadline_seconds

    def left(self) -> float:
        return self.end - time.perf_counter()

    def allows(self, seconds: float) -> bool:
        return seconds < self.left()


def set_checkpointing(model, enabled: bool) -> None:
    """Gradient checkpointing on or off (transformers 5.24 renamed the methods; 5.17 has only the old names)."""
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    getattr(model, f"{prefix}_checkpointing_{'enable' if enabled else 'disable'}")()


def build_model(spec, dtype, device, max_length: int):
    preset, overrides, _ = spec
    config = preset_config(preset, max_position_embeddings=max(max_length, 256), attn_implementation="sdpa",
                           **overrides)
    torch.manual_seed(0)
    with torch.device(device):
        model = DiffuAprielForMaskedLM(config)
    return model.to(dtype).train()


def collator_for(config) -> DataCollatorForMaskedDiffusion:
    """The train command's collator (its sampling_eps and block_size from the config). It reads only the tokenizer's
    mask and pad tokens and padding side, so a stand-in holding the config's serves a model with random weights."""
    tokenizer = SimpleNamespace(mask_token_id=config.mask_token_id, pad_token_id=config.pad_token_id,
                                padding_side="right")
    return DataCollatorForMaskedDiffusion(tokenizer, sampling_eps=config.sampling_eps, block_size=config.block_size)


def random_examples(config, count: int, length: int, seed: int) -> list[dict]:
    """`count` examples of `length` random tokens (never the mask token), each with a noise seed."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size - 1, (count, length), generator=generator)
    ids[ids >= config.mask_token_id] += 1  # every id but the mask token's
    return [{"input_ids": row.tolist(), "noise_seed": seed * 100_000 + i} for i, row in enumerate(ids)]


def training_batch(config, batch: int, length: int, device, mask_of_ones: bool = False, **options) -> dict:
    """A collated batch on `device` (no attention mask: nothing is padded), given an attention mask of ones with
    `mask_of_ones`, and `options` (other arguments of forward)."""
    collated = collator_for(config)(random_examples(config, batch, length, seed=length))
    if mask_of_ones:
        collated["attention_mask"] = torch.ones_like(collated["input_ids"])
    return {**{name: tensor.to(device) for name, tensor in collated.items()}, **options}


def train_step(model, optimizer, batch) -> None:
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed_step(model, optimizer, batch, device) -> float:
    """Seconds of one training step, timed with the device synchronised at its ends."""
    synchronize(device)
    start = time.perf_counter()
    train_step(model, optimizer, batch)
    synchronize(device)
    return time.perf_counter() - start


def timed_steps(model, optimizer, batch, reps: int, device) -> list[float]:
    """Seconds of `reps` training steps after one untimed step."""
    train_step(model, optimizer, batch)
    return [timed_step(model, optimizer, batch, device) for _ in range(reps)]


def ceiling_flops(device: torch.device, dtype) -> float:
    """FLOP/s of a large matrix product in `dtype` on `device`: the practical ceiling (harness.matmul_ceiling's 8192^3
    bf16 product on CUDA; a 1024^3 product on the CPU, which --smoke measures)."""
    if device.type == "cuda":
        return matmul_ceiling()
    a = torch.randn(1024, 1024, dtype=dtype)
    b = torch.randn_like(a)
    seconds = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - start)
    return 2 * 1024**3 / statistics.median(seconds)


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_memory_gib(device: torch.device):
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


class AllocatorWatch:
    """The CUDA caching allocator's retries (its cache flushed because an allocation did not fit) and peak reserved
    memory while the `with` block ran; None for both on other devices."""

    def __init__(self, device: torch.device):
        self.device, self.retries, self.peak_reserved_gib = device, None, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_stats().get("num_alloc_retries", 0)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) - self.start
            self.peak_reserved_gib = torch.cuda.max_memory_reserved() / 2**30


def measure_length(model, optimizer, length: int, run: dict, device, batch_size: Optional[int] = None,
                   **options) -> dict:
    """One row: the bare step at `length` (`batch_size` sequences, by default run["tokens_per_step"] // length,
    halved while a step runs out of memory, down to one; `options` passed to forward), or why it has no time."""
    batch_size = batch_size or run["tokens_per_step"] // length
    while True:
        row = dict(batch=batch_size, length=length, tokens=batch_size * length)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        out_of_memory = None
        try:  # the traceback holds the batch and the step's tensors until the handler ends
            batch = training_batch(model.config, batch_size, length, device, **options)
            seconds = timed_steps(model, optimizer, batch, run["reps"], device)
        except torch.OutOfMemoryError as error:
            out_of_memory = str(error).splitlines()[0][:200]
        if out_of_memory is None:
            break
        optimizer.zero_grad(set_to_none=True)
        free_memory(device)
        if batch_size == 1:
            return dict(row, status="out of memory", error=out_of_memory)
        batch_size //= 2
    row.update(step_seconds=seconds, step_ms=1e3 * statistics.median(seconds), peak_memory_gib=peak_memory_gib(device))
    add_rates(row, model.num_parameters(), run)
    return row


def add_rates(row: dict, parameters: int, run: dict) -> None:
    """Tokens per second, model TFLOP/s (6 x parameters x tokens) and MFU over the datasheet peak and the ceiling."""
    seconds = row["step_ms"] / 1e3
    flops = 6 * parameters * row["tokens"] / seconds
    row.update(tokens_per_s=row["tokens"] / seconds, model_tflops_per_s=flops / 1e12,
               mfu=flops / run["peak_bf16_flops"] if run["peak_bf16_flops"] else None,
               mfu_of_ceiling=flops / run["matmul_ceiling_flops"])


def measure_lengths(model, spec_name: str, checkpointing: bool, run: dict, device, clock: Clock) -> list[dict]:
    """The rows of every length in one checkpointing mode, with a fresh optimizer; a length that would end after the
    deadline (at (reps + 1) times 1.5 x the last step's time) is skipped."""
    set_checkpointing(model, checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    rows, last_step = [], 0.0
    for length in run["lengths"]:
        base = dict(model=spec_name, checkpointing=checkpointing)
        if not clock.allows(1.5 * (run["reps"] + 1) * last_step):
            rows.append(dict(base, length=length, status="skipped: deadline"))
            continue
        row = measure_length(model, optimizer, length, run, device)
        rows.append(dict(base, **row))
        last_step = row.get("step_ms", 1e3 * last_step) / 1e3
        print(row_line(rows[-1]), flush=True)
    del optimizer
    set_checkpointing(model, False)
    free_memory(device)
    return rows


def row_line(row: dict) -> str:
    mode = "on " if row["checkpointing"] else "off"
    head = f"{row['model']:26s} ckpt {mode} {row.get('batch', 0):3d} x {row['length']:6d}"
    if "status" in row:
        return f"{head}  {row['status']}"
    mfu = f"{row['mfu']:6.1%}" if row["mfu"] is not None else "   -  "
    memory = f"{row['peak_memory_gib']:5.1f} GiB" if row["peak_memory_gib"] is not None else ""
    return (f"{head}  step {row['step_ms']:9.1f} ms  {row['tokens_per_s']:10,.0f} tok/s  MFU {mfu} "
            f"(ceiling {row['mfu_of_ceiling']:6.1%})  {memory}")


class StepEnds(TrainerCallback):
    """Notes when each optimizer step of `Trainer.train()` ends, the device synchronised."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(self.device)
        self.times.append(time.perf_counter())


def trainer_step_seconds(model, batch_size: int, length: int, steps: int, device) -> list[float]:
    """Seconds between successive steps' ends of `Trainer.train()` with the train command's collator and defaults
    (`steps` steps: steps - 1 intervals, the first step's optimizer set-up outside them). The model trains as it is
    (bf16 weights, no autocast), as the bare step does; nothing is saved."""
    clock = StepEnds(device)
    with tempfile.TemporaryDirectory() as folder:
        arguments = TrainingArguments(
            output_dir=folder, **{**TRAINING_DEFAULTS, **FIXED_TRAINING_ARGUMENTS}, save_strategy="no",
            per_device_train_batch_size=batch_size, max_steps=steps, use_cpu=device.type == "cpu",
            optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch", disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=arguments, data_collator=collator_for(model.config),
                          train_dataset=random_examples(model.config, steps * batch_size, length, seed=7),
                          callbacks=[clock])
        trainer.train()
    del trainer
    free_memory(device)
    return [later - earlier for earlier, later in zip(clock.times, clock.times[1:])]


def trainer_comparison(model, spec_name: str, batch_size: int, run: dict, device) -> dict:
    """Trainer's step, and the bare step given an attention mask of ones, at run["trainer_length"] with the bare row's
    `batch_size`, no gradient checkpointing."""
    length = run["trainer_length"]
    entry = dict(model=spec_name, batch=batch_size, length=length, steps=run["trainer_steps"])
    set_checkpointing(model, False)
    try:  # the tensors live in the callees' frames, freed once the handler ends
        masked = bare_steps_with_mask(model, batch_size, length, run["reps"], device)
        free_memory(device)
        with AllocatorWatch(device) as bare_watch:
            changing = bare_steps_changing_batches(model, batch_size, length, run["trainer_steps"], device)
        free_memory(device)
        with AllocatorWatch(device) as trainer_watch:
            intervals = trainer_step_seconds(model, batch_size, length, run["trainer_steps"], device)
    except torch.OutOfMemoryError as error:
        entry.update(status="out of memory", error=str(error).splitlines()[0][:200])
    free_memory(device)
    model.train()
    if "status" in entry:
        return entry
    entry.update(bare_with_mask_seconds=masked, bare_with_mask_ms=1e3 * statistics.median(masked),
                 bare_changing_seconds=changing, bare_changing_ms=1e3 * statistics.median(changing),
                 bare_changing_alloc_retries=bare_watch.retries,
                 bare_changing_peak_reserved_gib=bare_watch.peak_reserved_gib,
                 trainer_step_seconds=intervals, trainer_step_ms=1e3 * statistics.median(intervals),
                 trainer_alloc_retries=trainer_watch.retries, trainer_peak_reserved_gib=trainer_watch.peak_reserved_gib)
    print(f"{spec_name:26s} Trainer {batch_size:3d} x {length:6d}  step {entry['trainer_step_ms']:9.1f} ms; bare step "
          f"with an attention mask of ones {entry['bare_with_mask_ms']:9.1f} ms", flush=True)
    return entry


def bare_steps_with_mask(model, batch_size: int, length: int, reps: int, device) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = training_batch(model.config, batch_size, length, device, mask_of_ones=True)
    seconds = timed_steps(model, optimizer, batch, reps, device)
    optimizer.zero_grad(set_to_none=True)
    return seconds


def bare_steps_changing_batches(model, batch_size: int, length: int, steps: int, device) -> list[float]:
    """Seconds of the bare step over `steps` different batches (each one's noise its own, as the Trainer's are), after
    an untimed step of the first: steps - 1 of them, as many as the Trainer's timed intervals."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    collator = collator_for(model.config)
    batches = [{name: tensor.to(device) for name, tensor in collator(random_examples(
        model.config, batch_size, length, seed=1000 + step)).items()} for step in range(steps)]
    train_step(model, optimizer, batches[0])
    seconds = [timed_step(model, optimizer, batch, device) for batch in batches[1:]]
    optimizer.zero_grad(set_to_none=True)
    return seconds


def every_position_logits(model, batch_size: int, run: dict, device) -> dict:
    """The bare step at run["trainer_length"] with the loss from the logits of every position (`skip_logits=False`),
    from the `batch_size` of the rows' default (the labelled positions' alone), against it."""
    set_checkpointing(model, False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    row = measure_length(model, optimizer, run["trainer_length"], run, device, batch_size, skip_logits=False)
    del optimizer
    free_memory(device)
    return row


def warm_up(model, run: dict, device) -> float:
    """One training step of a single shortest sequence, so that the kernels compile before anything is timed (the
    optimizer is thrown away). Returns its seconds."""
    start = time.perf_counter()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    train_step(model, optimizer, training_batch(model.config, 1, run["lengths"][0], device))
    synchronize(device)
    del optimizer
    free_memory(device)
    return time.perf_counter() - start


def measure_model(name: str, spec, run: dict, device, clock: Clock) -> dict:
    """Every row of one model: its lengths without and with gradient checkpointing (run["checkpointing"]: both, or
    one mode), and the Trainer comparison."""
    model = build_model(spec, getattr(torch, run["dtype"]), device, max(run["lengths"]))
    entry = dict(parameters=model.num_parameters(), baseline=spec[2], block_size=model.config.block_size,
                 warm_up_seconds=warm_up(model, run, device), rows=[])
    if run["checkpointing"] != "on":
        entry["rows"] += measure_lengths(model, name, False, run, device, clock)
    timed = {row["length"]: row for row in entry["rows"] if "step_ms" in row}
    step = {length: row["step_ms"] / 1e3 for length, row in timed.items()}
    trainer_length = run["trainer_length"]
    expected = 1.5 * (run["reps"] + 1 + run["trainer_steps"]) * step.get(trainer_length, 0.0) + 10
    if trainer_length not in step:
        entry["trainer"] = dict(length=trainer_length, status="no bare step at this length")
    elif not clock.allows(expected):
        entry["trainer"] = dict(length=trainer_length, status="skipped: deadline")
    else:
        entry["trainer"] = trainer_comparison(model, name, timed[trainer_length]["batch"], run, device)
    if trainer_length in step and clock.allows(1.5 * (run["reps"] + 1) * step[trainer_length]):
        entry["every_position_logits"] = every_position_logits(model, timed[trainer_length]["batch"], run, device)
    if run["checkpointing"] != "off":
        entry["rows"] += measure_lengths(model, name, True, run, device, clock)
    del model
    free_memory(device)
    return entry


def run_benchmark(args) -> dict:
    clock = Clock(args.deadline)
    device = torch.device(args.device)
    specs = SMOKE_MODELS if args.smoke else MODELS
    name = device_name()
    result = new_result(
        dtype=args.dtype, lengths=args.lengths, tokens_per_step=args.tokens_per_step, reps=args.reps,
        trainer_length=args.trainer_length, trainer_steps=args.trainer_steps, deadline_seconds=args.deadline,
        checkpointing=args.checkpointing,
        peak_bf16_flops=peak_bf16(name) if device.type == "cuda" else None,
        matmul_ceiling_flops=ceiling_flops(device, getattr(torch, args.dtype)), models={},
    )
    run = dict(result, device=device)  # what the measurements read: the settings and both FLOP/s references
    stem = Path(args.out) / "training_throughput"
    for model_name in args.models or list(specs):
        if not clock.allows(MODEL_START_MARGIN):
            result["models"][model_name] = dict(status="skipped: deadline", rows=[])
            continue
        try:
            result["models"][model_name] = measure_model(model_name, specs[model_name], run, device, clock)
        except Exception as error:  # noqa: BLE001 - one model's failure (a kernel that does not build) is recorded,
            # and the scarce GPU call goes on with the others
            traceback.print_exc()
            result["models"][model_name] = dict(status=f"failed: {type(error).__name__}: {error}"[:300], rows=[])
        free_memory(device)
        save(result, stem, markdown=markdown(result))  # what is measured so far survives a crash
    result["seconds"] = args.deadline - clock.left()
    write(result, stem)
    return result


def measured(result: dict, name: str, checkpointing: bool = False) -> dict:
    """{length: row} of a model's timed rows in one checkpointing mode."""
    rows = result["models"].get(name, {}).get("rows", [])
    return {row["length"]: row for row in rows if row["checkpointing"] == checkpointing and "step_ms" in row}


def ratio_to_baseline(result: dict, name: str, row: dict):
    baseline = measured(result, result["models"][name]["baseline"], row["checkpointing"]).get(row["length"])
    return row["tokens_per_s"] / baseline["tokens_per_s"] if baseline else None


def percent(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def step_table(result: dict) -> list[str]:
    lines = ["| model | checkpointing | batch x length | step ms | tokens/s | vs DiffuTran | MFU (datasheet) | "
             "MFU (ceiling) | peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in result["models"].items():
        if "status" in entry:  # a model the deadline left out
            lines.append(f"| {name} | | | {entry['status']} | | | | | |")
        for row in entry["rows"]:
            shape = f"{row.get('batch', '-')} x {row['length']}"
            mode = "on" if row["checkpointing"] else "off"
            if "status" in row:
                lines.append(f"| {name} | {mode} | {shape} | {row['status']} | | | | | |")
                continue
            ratio = ratio_to_baseline(result, name, row)
            memory = "-" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.1f}"
            lines.append(f"| {name} | {mode} | {shape} | {row['step_ms']:.1f} | {row['tokens_per_s']:,.0f} | "
                         f"{'-' if ratio is None else f'{ratio:.2f}x'} | {percent(row['mfu'])} | "
                         f"{percent(row['mfu_of_ceiling'])} | {memory} |")
    return lines


def trainer_table(result: dict) -> list[str]:
    lines = ["| model | batch x length | bare step ms | bare step ms, mask of ones | bare step ms, changing batches "
             "(allocator retries, peak reserved GiB) | Trainer step ms (allocator retries, peak reserved GiB) | "
             "Trainer / bare | Trainer / bare with the mask |", "|---|---|---|---|---|---|---|---|"]
    for name, entry in result["models"].items():
        trainer = entry.get("trainer")
        if trainer is None:
            continue
        shape = f"{trainer.get('batch', '-')} x {trainer['length']}"
        if "status" in trainer:
            lines.append(f"| {name} | {shape} | {trainer['status']} | | | | | |")
            continue
        bare = measured(result, name)[trainer["length"]]["step_ms"]
        changing = "-" if "bare_changing_ms" not in trainer else (  # runs before the column existed
            f"{trainer['bare_changing_ms']:.1f}{allocator_note(trainer, 'bare_changing')}")
        lines.append(f"| {name} | {shape} | {bare:.1f} | {trainer['bare_with_mask_ms']:.1f} | {changing} | "
                     f"{trainer['trainer_step_ms']:.1f}{allocator_note(trainer, 'trainer')} | "
                     f"{trainer['trainer_step_ms'] / bare:.2f} | "
                     f"{trainer['trainer_step_ms'] / trainer['bare_with_mask_ms']:.2f} |")
    return lines


def allocator_note(entry: dict, prefix: str) -> str:
    """" (retries, peak reserved GiB)" where the allocator was watched (CUDA), else nothing."""
    retries, reserved = entry.get(f"{prefix}_alloc_retries"), entry.get(f"{prefix}_peak_reserved_gib")
    return "" if retries is None else f" ({retries}, {reserved:.1f})"


def logits_table(result: dict) -> list[str]:
    lines = ["| model | batch x length | step ms, labelled positions | step ms, every position | speed-up | "
             "peak GiB, labelled positions | peak GiB, every position |", "|---|---|---|---|---|---|---|"]
    for name, entry in result["models"].items():
        every = entry.get("every_position_logits")
        if every is None:
            continue
        labelled = measured(result, name)[result["trainer_length"]]
        shape = f"{every['batch']} x {every['length']}"
        if "status" in every:
            lines.append(f"| {name} | {shape} | {labelled['step_ms']:.1f} | {every['status']} | | | |")
            continue
        memory = [row["peak_memory_gib"] for row in (labelled, every)]
        memory = ["-" if value is None else f"{value:.1f}" for value in memory]
        lines.append(f"| {name} | {shape} | {labelled['step_ms']:.1f} | {every['step_ms']:.1f} | "
                     f"{labelled['tokens_per_s'] / every['tokens_per_s']:.2f}x | {memory[0]} | {memory[1]} |")
    return lines


def step_targets(result: dict, name: str, checkpointing: bool) -> list[str]:
    """The step targets of one model in one checkpointing mode: ahead of DiffuTran in tokens per second from 4K tokens
    a sequence and at least 2x at 16K, 40% of the datasheet peak from 4K on."""
    rows = measured(result, name, checkpointing)
    ratios = {length: ratio_to_baseline(result, name, row) for length, row in rows.items()}
    ratios = {length: ratio for length, ratio in ratios.items() if ratio is not None}
    head = f"- {name}{', checkpointing' if checkpointing else ''}"
    lines = []
    if ratios:
        behind = [length for length, ratio in ratios.items() if length >= 4096 and ratio <= 1]
        verdict = ("no length from 4K measured" if not any(length >= 4096 for length in ratios)
                   else f"missed at {behind}" if behind else "met")
        lines.append(f"{head} tokens/s against {result['models'][name]['baseline']}: "
                     + ", ".join(f"{length}: {ratio:.2f}x" for length, ratio in sorted(ratios.items()))
                     + f"; ahead from 4K: {verdict}")
    if 16384 in ratios:
        lines.append(f"{head} at 16K: {ratios[16384]:.2f}x (target >= 2x): {'met' if ratios[16384] >= 2 else 'missed'}")
    mfus = [row["mfu"] for length, row in rows.items() if length >= 4096 and row["mfu"]]
    if mfus:
        lines.append(f"{head} MFU from 4K: {min(mfus):.1%} to {max(mfus):.1%} of the datasheet peak (target >= 40%): "
                     f"{'met' if min(mfus) >= 0.4 else 'missed'}")
    return lines


def targets(result: dict) -> list[str]:
    """The issue's targets checked against this run, in each checkpointing mode, and Trainer within 10% of the bare
    step."""
    lines = []
    for name, entry in result["models"].items():
        if entry.get("baseline") not in (None, name):
            lines += step_targets(result, name, False) + step_targets(result, name, True)
    for name, entry in result["models"].items():
        trainer = entry.get("trainer", {})
        if "trainer_step_ms" in trainer:
            ratio = trainer["trainer_step_ms"] / measured(result, name)[trainer["length"]]["step_ms"]
            lines.append(f"- {name} Trainer step {ratio:.2f}x the bare step (target <= 1.10x): "
                         f"{'met' if ratio <= 1.1 else 'missed'}")
    return lines


def markdown(result: dict) -> str:
    peak = result["peak_bf16_flops"]
    peak_text = f"{peak / 1e12:.0f} TFLOP/s" if peak else "none (not a GPU)"
    lines = [
        f"# Training throughput: {', '.join(result['models'])}",
        "",
        f"Device: {result['environment']['device']}. {result['dtype']}, random weights. One step = forward with the "
        f"loss, backward, AdamW (fused on CUDA) and zero_grad on {result['tokens_per_step']:,} tokens (batch = "
        f"{result['tokens_per_step']:,} / length) from the train command's collator, passed without its attention "
        f"mask of ones; the median of {result['reps']} steps after an untimed one. MFU = 6 x parameters x tokens / "
        f"step time, over the datasheet's dense bf16 peak ({peak_text}) and over the measured ceiling "
        f"({result['matmul_ceiling_flops'] / 1e12:.3g} TFLOP/s, a large {result['dtype']} matrix product in the same "
        f"run). Block models run the noised and the clean stream together; their tokens count the noised stream. "
        f"Peak memory includes the weights, gradients and AdamW states. vs DiffuTran: tokens/s over those of the "
        f"DiffuTran model of the same kind (full-sequence or block) at the same length and checkpointing.",
        "",
        *step_table(result),
        "",
        "## Trainer against the bare step",
        "",
        f"`Trainer.train()` with the train command's collator and defaults (no gradient checkpointing, the model's "
        f"{result['dtype']} weights as they are, no autocast): the median time between successive steps' ends over "
        f"{result['trainer_steps']} steps (the data loading, collation, gradient clipping, scheduler and logging "
        f"included). Bare step with a mask of ones: the batch given an attention mask of ones, which takes the "
        f"padding path on CUDA (until the collator left out masks of ones, Trainer's batches carried one). Changing "
        f"batches: the bare step over as many batches as the Trainer's, each with its own noise; allocator retries: "
        f"the times the CUDA allocator flushed its cache because an allocation did not fit.",
        "",
        *trainer_table(result),
        "",
        "## The loss from the labelled positions' logits against every position's",
        "",
        "The bare step as above (whose loss takes the logits of the labelled positions alone, the default of a "
        "training step) against the same step with `skip_logits=False` (the LM head and the float32 cross-entropy "
        "over every position, the path before it), at the Trainer comparison's length.",
        "",
        *logits_table(result),
        "",
        "## Targets",
        "",
        *targets(result),
        *(["", "## Notes", "", *(f"- {note}" for note in result["notes"])] if result.get("notes") else []),
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for index, name in enumerate(result["models"]):
        colour = f"C{index}"
        for checkpointing, style in ((False, "-"), (True, "--")):
            rows = sorted(measured(result, name, checkpointing).items())
            if not rows:
                continue
            label = f"{name}{', checkpointing' if checkpointing else ''}"
            lengths = [length for length, _ in rows]
            left.plot(lengths, [row["tokens_per_s"] for _, row in rows], style, color=colour, marker="o", label=label)
            right.plot(lengths, [row["mfu_of_ceiling"] for _, row in rows], style, color=colour, marker="o",
                       label=label)
    left.set(xscale="log", yscale="log", xlabel="tokens a sequence", ylabel="training tokens per second")
    right.set(xscale="log", xlabel="tokens a sequence", ylabel="MFU over the measured matmul ceiling")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=7)
    figure.suptitle(f"Training steps of {result['tokens_per_step']:,} tokens, {result['dtype']}, "
                    f"{result['environment']['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def write(result: dict, stem: Path) -> None:
    """STEM.json, STEM.md and, where matplotlib is installed, STEM.png."""
    json_path = save(result, stem, markdown=markdown(result))
    try:
        plot(result, json_path.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no plot")


def report(args) -> None:
    """A run's results, their table and plot rendered again, into benchmarks/results/ (or --to)."""
    result = json.loads(Path(args.result).read_text())
    if "environment" not in result:
        raise ValueError(f"{args.result} carries no stamp: it was not written by this script")
    if args.note:
        result["notes"] = result.get("notes", []) + args.note
    write(result, Path(output_paths(args.to)[0]).with_suffix(""))
    print(markdown(result))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    running = commands.add_parser("run", help="measure (GPU; --smoke on the CPU)")
    running.add_argument("out", help="the folder for training_throughput.json, .md and .png")
    running.add_argument("--smoke", action="store_true", help="tiny models and lengths on the CPU, in seconds")
    running.add_argument("--models", nargs="+", help=f"among {list(MODELS)} (with --smoke: {list(SMOKE_MODELS)})")
    running.add_argument("--lengths", nargs="+", type=int, default=LENGTHS)
    running.add_argument("--tokens_per_step", type=int, default=TOKENS_PER_STEP)
    running.add_argument("--reps", type=int, default=2, help="timed steps at each length (after an untimed one)")
    running.add_argument("--trainer_length", type=int, default=4096, help="the length of the Trainer comparison")
    running.add_argument("--trainer_steps", type=int, default=6, help="Trainer steps (their intervals are timed)")
    running.add_argument("--deadline", type=float, default=450,
                         help="seconds from the start after which nothing new starts; the results are then saved")
    running.add_argument("--checkpointing", choices=["both", "off", "on"], default="both",
                         help="the gradient checkpointing modes measured (the Trainer and logits comparisons need off)")
    running.add_argument("--device", default="cuda")
    running.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    reporting = commands.add_parser("report", help="copy a run's results into benchmarks/results/")
    reporting.add_argument("result", help="the run's training_throughput.json")
    reporting.add_argument("--note", action="append", default=[],
                           help="a line saying what the run's numbers do not (repeatable; kept in the JSON)")
    reporting.add_argument("--to", default=str(RESULTS / "training_throughput"), help="path stem to write")
    args = parser.parse_args(argv)
    if args.command == "report":
        report(args)
        return
    if args.smoke:
        for field, value in SMOKE.items():
            setattr(args, field, value)
    specs = SMOKE_MODELS if args.smoke else MODELS
    unknown = [name for name in args.models or [] if name not in specs]
    if unknown:
        parser.error(f"unknown --models {unknown}: choose among {list(specs)}")
    if max(args.lengths) > args.tokens_per_step or any(args.tokens_per_step % length for length in args.lengths):
        parser.error("every length must divide --tokens_per_step")
    if args.trainer_length not in args.lengths:
        parser.error("--trainer_length must be one of --lengths")
    result = run_benchmark(args)
    print(markdown(result))


if __name__ == "__main__":
    main()
