"""Whole denoising steps of a preset with the model runtime as it is and as it was at another commit, alternating in one
process on one GPU: whether a change to the code changed its speed, and its logits. With `--training`, training steps
instead (forward with the MDLM loss and backward, `profile_step.training_step`), and their losses.

The runtime in `modeling/` imports its own files relatively only (it travels to Hub repos so), so a copy of it taken
from another commit imports beside the installed one as a package of its own. Both models get the same weights
(random, seed 0, copied from one to the other) and the same tokens; each step runs eagerly and replayed from a CUDA
graph, each runtime's own `GraphedDenoiser` (as `generate()` replays its steps), over several rounds.

    python benchmarks/compare_commits.py --baseline 07f6b64 --out benchmarks/results/compare_07f6b64

On a copy of the repository without its git folder, extract the baseline's runtime first and point at it:

    mkdir -p .baseline && git archive 07f6b64 modeling | tar -x -C .baseline
    python benchmarks/compare_commits.py --baseline-dir .baseline/modeling --out benchmarks/results/compare_07f6b64
    python benchmarks/compare_commits.py --baseline main --preset diffuapriel-1.3b-block --training --batch 2 \
        --lengths 4096 --out benchmarks/results/compare_main_training
"""

import argparse
import importlib
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import diffuapriel_hf.modeling
from harness import ROOT, median_ms, new_result, save  # benchmarks/harness.py, beside this script
from profile_step import training_step

BASELINE_PACKAGE = "baseline_modeling"


def extract_runtime(commit: str, folder: Path) -> Path:
    """`modeling/` as it was at `commit`, written under `folder`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "modeling"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder / "modeling"


def import_runtime(folder: Path, name: str):
    """The runtime in `folder` imported as the package `name` (its modules as `name.modeling_diffuapriel`, ...)."""
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return package


def build(runtime, preset: str, length: int, state_dict=None):
    """The preset from `runtime` in bf16 on CUDA, eval mode, SDPA attention; random (seed 0) or given weights."""
    modeling = importlib.import_module(f"{runtime.__name__}.modeling_diffuapriel")
    configuration = importlib.import_module(f"{runtime.__name__}.configuration_diffuapriel")
    config = configuration.DiffuAprielConfig.from_preset(preset, max_position_embeddings=length,
                                                         attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = modeling.DiffuAprielForMaskedLM(config)
    if state_dict is not None:
        model.load_state_dict(state_dict)  # strict: a renamed or reshaped weight is an error, not a silent skip
    return model.to(torch.bfloat16).eval()


def step_times(runtime, model, ids, reps: int) -> tuple[float, float, torch.Tensor]:
    """Eager and graphed step medians (ms), and the graphed logits of the first 256 positions (float32)."""
    graphs = importlib.import_module(f"{runtime.__name__}.cuda_graphs")
    with torch.no_grad():
        eager = median_ms(lambda: model(ids), reps=reps, warmup=2)
        denoiser = graphs.GraphedDenoiser(model, max_tokens=None)
        graphed = median_ms(lambda: denoiser(ids), reps=reps, warmup=2)
        logits = denoiser(ids)[0, :256].float()
    del denoiser
    torch.cuda.empty_cache()
    return eager, graphed, logits


def training_time(model, batch: int, length: int, reps: int) -> tuple[float, float]:
    """The median ms of a training step (seeded tokens, half of them masked, no optimizer) and its loss."""
    losses = []
    ms = median_ms(training_step(model, batch, length, losses), reps=reps, warmup=1)
    return ms, losses[-1].item()


def measure_round(args, runtimes: dict, models: dict, ids: torch.Tensor, result: dict) -> dict:
    """One timing of each model, recorded in result["step_ms"]; returns what each computed (logits or loss)."""
    batch, length = ids.shape
    computed = {}
    for name, model in models.items():
        if args.training:
            ms, computed[name] = training_time(model, batch, length, reps=3)
            result["step_ms"].setdefault(f"{batch} x {length}: {name}, training", []).append(ms)
            print(f"{batch} x {length:6d}  {name:8s}  training {ms:8.2f} ms  loss {computed[name]:.6f}", flush=True)
            continue
        eager, graphed, computed[name] = step_times(runtimes[name], model, ids, reps=5 if length > 16384 else 15)
        for mode, ms in (("eager", eager), ("graphed", graphed)):
            result["step_ms"].setdefault(f"{batch} x {length}: {name}, {mode}", []).append(ms)
        print(f"{batch} x {length:6d}  {name:8s}  eager {eager:8.2f} ms  graphed {graphed:8.2f} ms", flush=True)
    return computed


def compare(args, runtimes: dict, result: dict) -> None:
    for length in args.lengths:
        current = build(runtimes["current"], args.preset, length)
        models = dict(current=current, baseline=build(runtimes["baseline"], args.preset, length, current.state_dict()))
        ids = torch.randint(0, current.config.mask_token_id, (args.batch, length), device="cuda")
        for _ in range(args.rounds):
            computed = measure_round(args, runtimes, models, ids, result)
        if args.training:
            result["loss"][f"{args.batch} x {length}"] = computed
        else:
            difference = (computed["current"] - computed["baseline"]).abs().max().item()
            result["max_abs_logit_difference"][f"{args.batch} x {length}"] = difference
        save(result, args.out)  # what is measured so far survives a crash
        del models, current
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--baseline", help="the commit whose modeling/ to compare with (read with git archive)")
    source.add_argument("--baseline-dir", type=Path, help="a copy of modeling/ as it was at the baseline commit")
    parser.add_argument("--preset", default="diffuapriel-1.3b")
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 16384, 65536])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="sequences a step")
    parser.add_argument("--training", action="store_true", help="time training steps (forward + backward)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = new_result(baseline=args.baseline or str(args.baseline_dir), preset=args.preset, rounds=args.rounds,
                        batch=args.batch, training=args.training, step_ms={}, max_abs_logit_difference={}, loss={})
    with tempfile.TemporaryDirectory() as scratch:  # the extracted runtime is read while Triton compiles its kernels
        folder = args.baseline_dir or extract_runtime(args.baseline, Path(scratch))
        runtimes = {"current": diffuapriel_hf.modeling, "baseline": import_runtime(folder, BASELINE_PACKAGE)}
        compare(args, runtimes, result)


if __name__ == "__main__":
    main()
