"""Block diffusion quality (issue 18): DiffuApriel-8M and DiffuTran-8M trained as block models (blocks of 4, 16 and
32 tokens; --only picks) with the shipped model's recipe (benchmarks/default_model/: the same corpus, the shipped
tokenizer, 1,800 steps of 64 x 512 tokens, the same schedule and seed), scored as the full-sequence models were, and a
full-sequence DiffuTran-8M (run `diffutran-8m`) whose weights the recipe's first run did not keep.

On one GPU the trainings run side by side (8M models leave it room); each trained model is scored on the held-out
modules (benchmarks/default_model/evaluate.py: for a block model the block-factorised negative ELBO, an upper bound on
-log p(x) as the full-sequence one is), copied in bfloat16 with its tokenizer and the shipped generation config (its
block_length the block size of a block model), and packed as OUT/NAME.tar.gz; OUT/block_quality.json sums up:

    python benchmarks/block_quality.py train OUT [--runs DIR] [--stop_training_after SECONDS]

At --stop_training_after the trainings still running get SIGTERM: the train command stops at a step boundary with a
checkpoint, and the same command resumes them later (while --runs is kept). --only picks runs: on an H100 the four
side by side did not fit one 10-minute call (results/block_quality_partial.md: block-32 DiffuApriel about 3.5 steps
a second after some 140 s of kernel compilation, block 4 about 0.7, the DiffuTran runs about 6). --smoke runs the
whole pipeline on the CPU with tiny sizes. Then the share of completions that parse (after the eight function headers
of tests/test_default_model.py and after every one-line top-level function header of the held-out modules), greedy,
in float32 on the CPU or on --device:

    python benchmarks/block_quality.py parse MODEL_DIR [MODEL_DIR ...] --output FILE [--block_length N] [--device D]

and the table of both, with the shipped model's score from the train run (benchmarks/results/block_quality.*):

    python benchmarks/block_quality.py table OUT/block_quality.json --parse PARSE.json [...] [--note TEXT]
"""

import argparse
import json
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from diffuapriel_hf import DiffuAprielConfig, DiffuAprielForMaskedLM, DiffusionGenerationConfig
from diffuapriel_hf.training.evaluation import CODE_PROMPTS, completion_parse_rate
from diffuapriel_hf.training.stdlib_corpus import stdlib_files
from harness import new_result, save  # benchmarks/harness.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "src" / "diffuapriel_hf" / "default_model"  # its tokenizer is the one the recipe's first run trained
EVALUATE = ROOT / "benchmarks" / "default_model" / "evaluate.py"
# Blocks of 16 beside 4 and 32: block-4 DiffuApriel trains at about 0.7 steps a second on an H100 (its per-block SSM
# states are 1 GiB a layer at 64 x 512 tokens), too slow for a session's device time, so the table may take 16 and 32.
# The full-sequence DiffuTran beside them: its held-out score is on record (default_model/results.json) but not its
# weights, which the parse rate needs; the full-sequence DiffuApriel is the shipped model.
RUNS = tuple((preset, block_size) for preset in ("diffuapriel-8m", "diffutran-8m") for block_size in (4, 16, 32)) + (
    ("diffutran-8m", None),)
# The options of benchmarks/default_model/train_on_gpu.sh; --smoke replaces some for a CPU check of the pipeline.
RECIPE = dict(seq_len=512, per_device_train_batch_size=64, max_steps=1800, learning_rate=2e-3, warmup_steps=200,
              weight_decay=0.1, lr_scheduler_type="cosine", seed=0, eval_fraction=0, save_steps=1000000,
              logging_steps=100)
SMOKE = dict(seq_len=64, per_device_train_batch_size=2, max_steps=2, warmup_steps=1, logging_steps=1)
SMOKE_EVALUATION = ["--files", "1", "--seq_len", "64", "--num_samples", "2", "--batch_size", "2"]
SMOKE_TRAIN_FILES = 4
# A one-line top-level function header: `def name(...):`.
HEADER = re.compile(r"def \w+\(.*\):\s*$")
# The train command's progress bar, "steps done/steps [elapsed<left, rate it/s]" (not the tokenizer's, in examples/s).
PROGRESS = re.compile(r"(\d+)/(\d+) \[[^\]]*(?:it/s|s/it)\]")


def run_name(preset: str, block_size: int | None) -> str:
    return preset if block_size is None else f"{preset}-block{block_size}"


def training_options(args) -> dict:
    """The recipe's options, with --smoke's and --max_steps' changes."""
    steps = {} if args.max_steps is None else {"max_steps": args.max_steps}
    return {**RECIPE, **(SMOKE if args.smoke else {}), **steps}


def train_command(preset: str, block_size: int, run_dir: Path, files: list[str], recipe: dict,
                  smoke: bool) -> list[str]:
    command = [sys.executable, "-m", "diffuapriel_hf.training.train", "--train_files", *files, "--preset", preset,
               "--vocab_size", "4096", "--tokenizer", str(SHIPPED), "--output_dir", str(run_dir)]
    command += [] if block_size is None else ["--block_size", str(block_size)]
    command += [f"--{key}={value}" for key, value in recipe.items()]
    command += ["--use_cpu"] if smoke else ["--bf16"]
    if any(run_dir.glob("checkpoint-*")):  # stopped at an earlier deadline: continue where it stopped
        command += ["--resume_from_checkpoint", "last"]
    elif run_dir.exists():  # a start cut short before its first checkpoint: start again
        command += ["--overwrite_output_dir"]
    return command


class Run:
    """One model's way through training, evaluation and packing; its files are under `runs`: NAME/ (the train
    command's output), NAME.log, NAME.segments.json (wall-clock start, end and exit status of each training
    process), NAME-bf16/ (the packed copy) and NAME-heldout.json."""

    def __init__(self, preset: str, block_size: int, runs: Path, max_steps: int):
        self.preset, self.block_size, self.name = preset, block_size, run_name(preset, block_size)
        self.max_steps = max_steps
        self.dir, self.log = runs / self.name, runs / f"{self.name}.log"
        self.segments_file, self.copy = runs / f"{self.name}.segments.json", runs / f"{self.name}-bf16"
        self.heldout = runs / f"{self.name}-heldout.json"
        self.process, self.started, self.status = None, None, "waiting"

    def segments(self) -> list:
        return json.loads(self.segments_file.read_text()) if self.segments_file.exists() else []

    def start_training(self, files: list[str], recipe: dict, smoke: bool) -> None:
        command = train_command(self.preset, self.block_size, self.dir, files, recipe, smoke)
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.started, self.status = time.time(), "training"

    def end_training(self, exit_status: int) -> None:
        self.segments_file.write_text(json.dumps(self.segments() + [[self.started, time.time(), exit_status]]))

    def start_evaluation(self, smoke: bool) -> None:
        """Both the float32 weights and the bfloat16 copy scored on the held-out modules."""
        command = [sys.executable, str(EVALUATE), str(self.dir), str(self.copy), "--output", str(self.heldout)]
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(command + (SMOKE_EVALUATION if smoke else []), stdout=log,
                                            stderr=subprocess.STDOUT)
        self.status = "evaluating"


def export_copy(run_dir: Path, copy: Path, block_size: int | None) -> None:
    """The shipped model's form: bfloat16 weights, the tokenizer, and the shipped generation settings, with blocks of
    the model's own size for a block model."""
    model = DiffuAprielForMaskedLM.from_pretrained(run_dir, dtype=torch.bfloat16)
    own_blocks = {} if block_size is None else dict(block_length=block_size)
    model.generation_config = DiffusionGenerationConfig.from_pretrained(SHIPPED, **own_blocks)
    model.save_pretrained(copy)
    AutoTokenizer.from_pretrained(run_dir).save_pretrained(copy)


def pack(run: Run, out: Path) -> Path:
    """OUT/NAME.tar.gz: the bfloat16 copy with the training metrics, the log and (once there) the held-out scores."""
    archive = out / f"{run.name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(run.copy, arcname=run.name)
        for path in (run.heldout, run.dir / "train_results.json", run.log, run.segments_file):
            if path.exists():
                tar.add(path, arcname=f"{run.name}/results/{path.name}")
    return archive


def progress(run: Run) -> tuple[int, int]:
    """(steps done, steps in all) as the training progress bar last showed them ((0, max_steps) before it starts)."""
    bars = [(int(done), int(total)) for done, total in PROGRESS.findall(run.log.read_text(errors="replace"))
            if int(total) == run.max_steps]  # not the bars of loading or writing weights
    return bars[-1] if bars else (0, run.max_steps)


def step_reached(run: Run) -> int:
    """The optimizer steps done, as the progress bar or the newest checkpoint says (0 before either)."""
    steps = [int(path.name.split("-")[1]) for path in run.dir.glob("checkpoint-*")]
    return max(steps + [progress(run)[0] if run.log.exists() else 0])


def advance(run: Run, out: Path, smoke: bool) -> bool:
    """Moves `run` on once its process has ended: training -> evaluating (packed at once, the scores added when
    they come) -> scored, or to stopped / failed. Returns whether it moved."""
    exit_status = run.process.poll()
    if exit_status is None:
        return False
    if run.status == "training":
        run.end_training(exit_status)
        if (run.dir / "model.safetensors").exists():  # also when the deadline's SIGTERM came after the final save
            export_copy(run.dir, run.copy, run.block_size)
            pack(run, out)
            run.start_evaluation(smoke)
        else:  # 128 + SIGTERM: stopped at the deadline with a checkpoint
            run.status = "stopped" if exit_status == 128 + signal.SIGTERM else f"failed (exit {exit_status})"
    elif run.status == "evaluating":
        run.status = "scored" if exit_status == 0 else f"evaluation failed (exit {exit_status})"
        pack(run, out)
    print(f"[{time.strftime('%H:%M:%S')}] {run.name}: {run.status}", flush=True)
    return True


def start(runs: list[Run], out: Path, files: list[str], args) -> None:
    """Starts each run where an earlier call left it: scored (packed again), trained (evaluated), or not (trained)."""
    for run in runs:
        if run.heldout.exists():
            run.status = "scored"
            pack(run, out)
        elif (run.dir / "model.safetensors").exists():
            export_copy(run.dir, run.copy, run.block_size)
            pack(run, out)
            run.start_evaluation(args.smoke)
        else:
            run.start_training(files, training_options(args), args.smoke)


def supervise(runs: list[Run], out: Path, files: list[str], args, report) -> None:
    """Trains the runs side by side, the DiffuApriel ones first (`Priority`), stopping the trainings still going
    after --stop_training_after seconds; `report()` is called whenever a run moves on."""
    deadline, stopping, reported = time.time() + args.stop_training_after, False, time.time()
    start(runs, out, files, args)
    priority = Priority(runs, deadline)
    while any(run.status in ("training", "evaluating") for run in runs):
        time.sleep(2)
        if not stopping and time.time() > deadline:
            stopping = True
            priority.resume_all()
            for run in runs:
                if run.status == "training":
                    print(f"{run.name}: deadline reached, stopping at the next step boundary", flush=True)
                    run.process.send_signal(signal.SIGTERM)
        elif not stopping:
            priority.update()
        if time.time() - reported > 60 and any(run.status == "training" for run in runs):
            reported = time.time()
            print(f"[{time.strftime('%H:%M:%S')}] " + ", ".join(
                f"{run.name} {'/'.join(map(str, progress(run)))}{' (paused)' if run in priority.paused else ''}"
                for run in runs if run.status == "training"), flush=True)
        moved = [advance(run, out, args.smoke) for run in runs if run.status in ("training", "evaluating")]
        if any(moved):
            report()


class Priority:
    """The DiffuApriel trainings (the shipped model's kind: what the issue's decision rests on) come first: while one of
    them, at the rate it went over the last half minute, would end after the deadline but within twice the time left,
    the other trainings are paused (SIGSTOP), leaving it the GPU; they go on (SIGCONT) once the DiffuApriel ones would
    end 30 s before it, or have ended, or could not end in time anyway."""

    SAMPLE_EVERY, MARGIN = 30.0, 30.0

    def __init__(self, runs: list[Run], deadline: float):
        self.first = [run for run in runs if run.preset.startswith("diffuapriel")]
        self.others = [run for run in runs if run not in self.first]
        self.deadline, self.paused, self.samples, self.sampled = deadline, [], {}, 0.0

    def projected_end(self, run: Run):
        """When `run` would end at its latest rate; None while unknown (no two samples, or no step between them)."""
        if len(self.samples.get(run.name, [])) < 2:
            return None
        (then, step_then, _), (now, step, total) = self.samples[run.name][-2:]
        return now + (total - step) * (now - then) / (step - step_then) if step > step_then else None

    def update(self) -> None:
        if time.time() - self.sampled < self.SAMPLE_EVERY:
            return
        self.sampled = time.time()
        for run in self.first:
            self.samples.setdefault(run.name, []).append((time.time(), *progress(run)))
        now = time.time()
        ends = [self.projected_end(run) for run in self.first if run.status == "training"]
        # A run that needs more than twice the time left would miss the deadline even with the GPU to itself (pausing
        # the others at most doubles its share): pausing them for it would only cost their results.
        ends = [end for end in ends if end is None or end - now < 2 * (self.deadline - now)]
        late = any(end is not None and end > self.deadline for end in ends)
        in_time = all(end is not None and end < self.deadline - self.MARGIN for end in ends)
        running_others = [run for run in self.others if run.status == "training"]
        if late and running_others and not self.paused:
            self.paused = running_others
            for run in self.paused:
                run.process.send_signal(signal.SIGSTOP)
            print(f"pausing {[run.name for run in self.paused]}: the DiffuApriel runs would end after the deadline",
                  flush=True)
        elif in_time and self.paused:
            self.resume_all()

    def resume_all(self) -> None:
        for run in self.paused:
            run.process.send_signal(signal.SIGCONT)
        if self.paused:
            print(f"resuming {[run.name for run in self.paused]}", flush=True)
        self.paused = []


def summary(runs: list[Run], shipped_heldout: Path, recipe: dict) -> dict:
    """block_quality.json: each run's state, steps, training wall time and held-out scores; the shipped model rescored
    on this machine."""
    def scores(path: Path) -> dict:
        return json.loads(path.read_text())["models"] if path.exists() else {}

    result = new_result(recipe=recipe, shipped_tokenizer=str(SHIPPED.relative_to(ROOT)), runs={},
                        shipped_heldout=scores(shipped_heldout))
    for run in runs:
        heldout = scores(run.heldout)
        train_results = run.dir / "train_results.json"
        result["runs"][run.name] = dict(
            preset=run.preset, block_size=run.block_size, status=run.status, steps=step_reached(run),
            training_wall_s=sum(end - start for start, end, _ in run.segments()), training_segments=run.segments(),
            train_results=json.loads(train_results.read_text()) if train_results.exists() else None,
            heldout_float32=heldout.get(str(run.dir)), heldout_bfloat16_copy=heldout.get(str(run.copy)),
        )
    return result


def log_tails(runs: list[Run], lines: int = 20) -> str:
    """Each run's logged losses and its last lines."""
    def tail(run: Run) -> str:
        logged = run.log.read_text().splitlines()
        return "\n".join([line for line in logged if line.startswith("{'loss'")] + logged[-lines:])

    return "\n".join(f"===== {run.name} =====\n{tail(run)}" for run in runs if run.log.exists())


def background_evaluations(runs: list[Run], runs_dir: Path, smoke: bool) -> list[subprocess.Popen]:
    """The shipped model scored on this machine (the reference the runs are read against), and a first evaluation of
    a random block DiffuApriel of each block size trained, so that Triton compiles the float32 kernels of the block
    passes while the trainings run rather than after them."""
    processes, quick = [], SMOKE_EVALUATION if smoke else ["--files", "1", "--num_samples", "1"]
    if not (runs_dir / "shipped-heldout.json").exists():
        processes.append(subprocess.Popen([sys.executable, str(EVALUATE), str(SHIPPED), "--output",
                                           str(runs_dir / "shipped-heldout.json")] + (quick if smoke else [])))
    folders = []
    for block_size in sorted({run.block_size for run in runs if run.preset.startswith("diffuapriel")}):
        folder = runs_dir / f"kernel-warm-up-block{block_size}"
        config = DiffuAprielConfig.from_pretrained(SHIPPED, block_size=block_size)
        DiffuAprielForMaskedLM(config).save_pretrained(folder)
        AutoTokenizer.from_pretrained(SHIPPED).save_pretrained(folder)
        folders.append(str(folder))
    if folders:
        processes.append(subprocess.Popen([sys.executable, str(EVALUATE), *folders, "--output",
                                           str(runs_dir / "kernel-warm-up.json"), *quick], stdout=subprocess.DEVNULL))
    return processes


def train(args) -> int:
    out, runs_dir = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    files = [str(path) for path in stdlib_files("train")][: SMOKE_TRAIN_FILES if args.smoke else None]
    recipe = training_options(args)
    runs = [Run(preset, block_size, runs_dir, recipe["max_steps"]) for preset, block_size in RUNS
            if args.only is None or run_name(preset, block_size) in args.only]
    shipped_heldout = runs_dir / "shipped-heldout.json"
    evaluations = background_evaluations(runs, runs_dir, args.smoke)

    def report():  # written as the runs move on, so that a call cut short still brings back what was done
        save(summary(runs, shipped_heldout, recipe), out / "block_quality")
        (out / "logs.txt").write_text(log_tails(runs))

    supervise(runs, out, files, args, report)
    for process in evaluations:
        process.wait()
    report()
    for name, run in json.loads((out / "block_quality.json").read_text())["runs"].items():
        bits = (run["heldout_float32"] or {}).get("bits_per_token")
        print(f"{name}: {run['status']}, step {run['steps']}, {run['training_wall_s']:.0f} s training, "
              f"held-out {bits if bits is None else round(bits, 3)} bits/token")
    return 0 if all(run.status == "scored" for run in runs) else 1


def heldout_headers() -> list[str]:
    """Every one-line top-level function header of the held-out modules, in file order: code none of the models was
    trained on."""
    return [line.rstrip() for path in stdlib_files("heldout")
            for line in path.read_text(encoding="utf-8").splitlines() if HEADER.match(line)]


def parse(args) -> int:
    """The share of completions that parse, for each model, after the test's eight headers and the held-out ones,
    greedy as `diffuapriel generate` is by default, with the model's generation config (--block_length overrides its
    block length)."""
    prompt_sets = dict(test_prompts=list(CODE_PROMPTS), heldout_headers=heldout_headers())
    if args.test_prompts_only:
        del prompt_sets["heldout_headers"]
    result = new_result(prompt_sets={name: len(prompts) for name, prompts in prompt_sets.items()}, models={})
    for folder in args.models:
        # float32 (on the CPU by default); a block model scans its block rows in short chunks itself
        # (Mamba2Mixer.chunk_size_for)
        model = DiffuAprielForMaskedLM.from_pretrained(folder, dtype=torch.float32).to(args.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        settings = dict(seed=0, **({} if args.block_length is None else dict(block_length=args.block_length)))
        row = dict(device=str(model.device), block_size=model.config.block_size,
                   mamba_chunk_size=model.config.mamba_chunk_size,
                   block_length=settings.get("block_length", model.generation_config.block_length))
        for name, prompts in prompt_sets.items():
            started = time.time()
            row[name] = completion_parse_rate(model, tokenizer, prompts, **settings)
            row[name]["seconds"] = time.time() - started
            print(f"{folder} (block_length {row['block_length']}): {name} {row[name]['parsed']}/{len(prompts)}",
                  flush=True)
        result["models"][folder] = row
    save(result, args.output)
    return 0


def model_key(folder: str) -> str:
    """The run a parse result's model folder belongs to (NAME-bf16 -> NAME); the shipped model is "shipped"."""
    name = Path(folder).name
    shipped = Path(folder).resolve() == SHIPPED.resolve() or name == SHIPPED.name
    return "shipped" if shipped else name.removesuffix("-bf16")


def table_rows(result: dict) -> list[str]:
    """The Markdown rows: each full-sequence model above its block variants, with the held-out bound, the parse
    shares and the training time."""
    runs, parsed = result["runs"], result["parse"]
    shipped = next(iter(result["shipped_heldout"].values()), {})
    rows = [dict(name="shipped", preset="diffuapriel-8m", block_size=None, bits=shipped.get("bits_per_token"))]
    rows += [dict(name=name, preset=run["preset"], block_size=run["block_size"],
                  bits=(run["heldout_float32"] or {}).get("bits_per_token"), seconds=run["training_wall_s"])
             for name, run in runs.items()]
    rows.sort(key=lambda row: (row["preset"], row["block_size"] or 0))
    lines = []
    for row in rows:
        parse = parsed.get(row["name"], {})
        shares = [f"{parse[key]['parsed']}/{parse[key]['prompts']}" if key in parse else "" for key in
                  ("test_prompts", "heldout_headers")]
        both = [parse[key] for key in ("test_prompts", "heldout_headers") if key in parse]
        total = sum(part["parsed"] for part in both) / sum(part["prompts"] for part in both) if both else None
        label = f"`{row['preset']}`" + (" (shipped)" if row["name"] == "shipped" else "")
        lines.append("| " + " | ".join([
            label, "full sequence" if row["block_size"] is None else f"blocks of {row['block_size']}",
            "" if row["bits"] is None else f"{row['bits']:.3f}", *shares,
            "" if total is None else f"{100 * total:.1f}%",
            "trained before" if row["name"] == "shipped" else f"{row['seconds']:.0f} s"]) + " |")
    return lines


def table(args) -> int:
    """One result (the training run's JSON with the parse results under "parse", keyed by run) and its table."""
    result = json.loads(Path(args.result).read_text())
    result["parse"], result["parse_environments"], result["notes"] = {}, [], args.note
    for path in args.parse:
        parse_result = json.loads(Path(path).read_text())
        result["parse_environments"].append(parse_result["environment"])
        for folder, row in parse_result["models"].items():
            result["parse"][model_key(folder)] = row
    header = ["| model | blocks | held-out bits/token (negative ELBO bound) | parse, test headers | parse, held-out "
              "headers | parse, all | training (side by side) |", "|---|---|---|---|---|---|---|"]
    notes = [line for note in args.note for line in (f"- {note}", "")]
    markdown = "\n".join(["# Block diffusion quality (issue 18)", "", *header, *table_rows(result), "", *notes])
    save(result, args.to, markdown)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    training = commands.add_parser("train", help="train, score and pack the four block models (GPU)")
    training.add_argument("out", help="the folder for the packed models, block_quality.json and logs.txt")
    training.add_argument("--runs", default="/tmp/block_quality_runs",
                          help="the folder of the training runs, kept between calls to resume them")
    training.add_argument("--stop_training_after", type=float, default=450,
                          help="seconds after which the trainings still running stop with a checkpoint")
    training.add_argument("--only", nargs="+", choices=[run_name(*run) for run in RUNS],
                          help="these runs only (default: all four)")
    training.add_argument("--max_steps", type=int,
                          help="optimizer steps instead of the recipe's 1,800 (or --smoke's 2): to check the pipeline")
    training.add_argument("--smoke", action="store_true", help="the whole pipeline with tiny sizes, on the CPU")
    parsing = commands.add_parser("parse", help="the share of completions that parse (CPU)")
    parsing.add_argument("models", nargs="+", help="model folders")
    parsing.add_argument("--block_length", type=int, help="override the models' generation block length")
    parsing.add_argument("--test_prompts_only", action="store_true", help="only the test's eight headers")
    parsing.add_argument("--device", default="cpu", help="where the models generate, in float32 (default: cpu)")
    parsing.add_argument("--output", required=True)
    tabling = commands.add_parser("table", help="the train run's and the parse runs' results as one table (CPU)")
    tabling.add_argument("result", help="the train run's block_quality.json")
    tabling.add_argument("--parse", nargs="+", default=[], help="parse results")
    tabling.add_argument("--note", action="append", default=[], help="a paragraph under the table (repeatable)")
    tabling.add_argument("--to", default=str(ROOT / "benchmarks" / "results" / "block_quality"),
                         help="path stem of the JSON and Markdown to write")
    args = parser.parse_args(argv)
    return {"train": train, "parse": parse, "table": table}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
