"""What the benchmark scripts share: the stamp every result carries (the commit measured, whether the tracked files
differed from it, the device, the library versions), the writing of results, and the timing helpers, model builder
and kernel-against-library comparison (timed launch sweeps, shared SSD inputs) of the GPU scripts. The scripts import
it from beside them:

    from harness import build, graphed_step_ms, new_result, save

    result = new_result(rounds=3)            # {"environment": {...}, "rounds": 3}, stamped before measuring
    ...
    save(result, args.out, markdown=table)   # OUT.json, and OUT.md with the stamp under the table

A result written by another tool (Trainer's train_results.json) is stamped in place:

    python benchmarks/harness.py stamp OUT_DIR/1gpu.json

On a copy of the repository without its git folder (a GPU machine sent the working tree alone), the commit comes
from the environment variable DIFFUAPRIEL_COMMIT, which the command that copied the tree sets (the stamp then says
that whether the tree differed from that commit is unknown); when set, it wins over any git folder around the copy.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from diffuapriel_hf import DiffuAprielForMaskedLM, preset_config
from diffuapriel_hf.modeling.cuda_graphs import GraphedDenoiser
from diffuapriel_hf.modeling.modeling_diffuapriel import BidirectionalMamba2Mixer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
COMMIT_VARIABLE = "DIFFUAPRIEL_COMMIT"
LIBRARIES = ("torch", "transformers", "triton", "mamba-ssm", "causal-conv1d")
# Dense bf16 tensor-core peaks from NVIDIA's datasheets (without sparsity), by a substring of the device name.
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12),
             ("A100", 312e12)]


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def source_revision() -> dict:
    """The commit checked out and whether tracked files differ from it (results aside: a run rewrites them); the
    commit named by DIFFUAPRIEL_COMMIT when it is set (a tree copied out of its repository may sit inside another
    checkout, whose git would answer for it)."""
    if COMMIT_VARIABLE in os.environ:
        return dict(commit=os.environ[COMMIT_VARIABLE], dirty=None, commit_from=COMMIT_VARIABLE)
    try:
        commit = _git("rev-parse", "HEAD")
        changed = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    except (OSError, subprocess.CalledProcessError) as error:
        if COMMIT_VARIABLE not in os.environ:
            raise RuntimeError(
                f"cannot read the commit ({error}): run from a git checkout, or set {COMMIT_VARIABLE} to the commit "
                "whose tree this is"
            ) from error
        return dict(commit=os.environ[COMMIT_VARIABLE], dirty=None, commit_from=COMMIT_VARIABLE)
    return dict(commit=commit, dirty=bool(changed))


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()}, torch threads: {torch.get_num_threads()}"


def library_versions() -> dict:
    """Python's version and each library's (None: not installed)."""
    versions = dict(python=platform.python_version())
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def mamba_deterministic() -> bool:
    """Whether mamba-ssm runs deterministically, as it decides (`mamba_ssm.utils.determinism`): MAMBA_DETERMINISTIC
    starting with 1, or unset and torch's deterministic algorithms on. Its kernels then take fixed launch settings
    instead of autotuning, which changes timings (a 1.3B training step's kernels: 435 vs 373 ms,
    results/profile_train_4k_deterministic.json)."""
    value = os.environ.get("MAMBA_DETERMINISTIC")
    return value[0] == "1" if value else torch.are_deterministic_algorithms_enabled()


def environment() -> dict:
    """The stamp of a result: when, which commit, on what, with which libraries, mamba-ssm deterministic or not."""
    return dict(time_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"), **source_revision(),
                device=device_name(), cuda=torch.version.cuda, versions=library_versions(),
                mamba_deterministic=mamba_deterministic())


def new_result(**fields) -> dict:
    """A result stamped now, before anything is measured, holding `fields`."""
    return dict(environment=environment(), **fields)


def stamp_line(result: dict) -> str:
    """One line saying what the result was measured with, for the Markdown beside it."""
    env = result["environment"]
    dirty = {True: " with uncommitted changes", False: "", None: " (uncommitted changes unknown)"}[env["dirty"]]
    versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items() if version is not None)
    cuda = f", CUDA {env['cuda']}" if env["cuda"] else ""
    deterministic = "; mamba-ssm deterministic (fixed launch settings)" if env.get("mamba_deterministic") else ""
    return (f"Measured {env['time_utc']} at commit {env['commit'][:12]}{dirty} on {env['device']}{cuda}; "
            f"{versions}{deterministic}.")


def output_paths(out) -> tuple[Path, Path]:
    """OUT.json and OUT.md for `out` given with or without either suffix (a stem such as `block_cache_gpu_1.3b` keeps
    its dots)."""
    stem = str(out).removesuffix(".json").removesuffix(".md")
    return Path(stem + ".json"), Path(stem + ".md")


def save(result: dict, out, markdown: str = None) -> Path:
    """Writes `result` (from `new_result`) as OUT.json and, given `markdown`, OUT.md with the stamp under it."""
    if "environment" not in result:
        raise ValueError("the result carries no stamp: build it with new_result()")
    json_path, markdown_path = output_paths(out)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    if markdown is not None:
        markdown_path.write_text(markdown.rstrip("\n") + "\n\n" + stamp_line(result) + "\n")
    return json_path


def rows_of_each_model(result: dict, out, names, build_model, rows, markdown) -> None:
    """For each model name: `build_model(name)`, then every row that `rows(model, name)` yields, appended to
    result["rows"], printed and saved with `markdown(result)` as it comes (a run cut short keeps what it measured);
    each model is freed before the next is built."""
    for name in names:
        model = build_model(name)
        for row in rows(model, name):
            result["rows"].append(row)
            print(row, flush=True)
            save(result, out, markdown=markdown(result))
        del model
        torch.cuda.empty_cache()


def stamp_file(path: Path) -> None:
    """Adds the stamp to a JSON object that another tool wrote."""
    result = json.loads(path.read_text())
    if not isinstance(result, dict) or "environment" in result:
        raise ValueError(f"{path} is not an unstamped JSON object")
    path.write_text(json.dumps(dict(environment=environment(), **result), indent=1) + "\n")


# ----------------------------------------------------------------------------------------------------------------------
# GPU timing and the models the throughput scripts measure.


def peak_bf16(device: str) -> float:
    for key, value in PEAK_BF16:
        if key in device:
            return value
    raise ValueError(f"no datasheet bf16 peak known for {device!r}: add it to PEAK_BF16")


def wall_seconds(fn, reps: int, warmup: int = 1) -> list:
    """The wall-clock seconds of each of `reps` calls of `fn()` after `warmup` untimed ones; with CUDA initialised,
    each call is timed from a synchronised device to a synchronised device (a call on the CPU, or one that includes
    host work, such as generate() or an optimizer step, where `median_ms`'s events would miss the host)."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(reps):
        _synchronize()
        start = time.perf_counter()
        fn()
        _synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def _synchronize() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_ms(fn, reps: int, warmup: int = 1) -> float:
    """Median milliseconds of `fn()` on the current CUDA stream, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def graphed_call_ms(call, calls: int = 10) -> float:
    """One call's time on the GPU alone: `calls` calls captured in one CUDA graph (after an eager one, which compiles
    and allocates), the graph's median replay divided by `calls`. Small kernels timed eagerly measure the host's
    launches instead, as generate()'s graphed steps never pay them."""
    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            call()
    return median_ms(graph.replay, reps=20, warmup=2) / calls


def graphed_step_ms(model, ids, reps: int, warmup: int = 1) -> float:
    """Median time of one denoising step on `ids` replayed from a CUDA graph (captured here, released after)."""
    with torch.no_grad():
        denoiser = GraphedDenoiser(model, max_tokens=None)
        ms = median_ms(lambda: denoiser(ids), reps=reps, warmup=warmup)
    del denoiser
    torch.cuda.empty_cache()
    return ms


def max_abs_differences(names, got, reference) -> dict:
    """The largest absolute difference of each output from its reference, by name."""
    return {name: (a.float() - b.float()).abs().max().item() for name, a, b in zip(names, got, reference)}


def timed_launch(fields: dict, run, difference, reps: int, warmup: int = 1) -> dict:
    """One launch setting of a kernel sweep: `fields` with `difference(run())` and the median ms of `run`, or, where the
    setting does not fit the multiprocessor (registers, shared memory) or fails to compile, the error as its time."""
    try:
        return dict(fields, max_abs_diff=difference(run()), ms=median_ms(run, reps=reps, warmup=warmup))
    except Exception as error:
        return dict(fields, max_abs_diff=None, ms=repr(error).splitlines()[0][:120])


def fastest(sweep: list) -> dict:
    """The sweep's setting of least time (among those that ran)."""
    return min((s for s in sweep if isinstance(s["ms"], float)), key=lambda s: s["ms"])


def kernel_comparison_row(label: str, library: str, names, theirs, ours, sweep, sweep_reps: int = 10,
                          sweep_warmup: int = 1, **fields) -> dict:
    """A kernel of ours against the library's at one shape: `fields`, the median ms of `theirs()` (as
    `{library}_ms`) and of `ours()` (its default launch), ours' largest differences from theirs and their scale,
    then `sweep`, pairs (launch fields, call) each timed by `timed_launch`, and the fastest of them. `fields` may
    carry `gigabytes`, what the kernel must read and write once, for the bandwidth printed."""
    reference = [t.clone() for t in theirs()]  # apart from the buffers the next call writes
    row = dict(fields, **{f"{library}_ms": median_ms(theirs, reps=20, warmup=2)},
               ours_ms=median_ms(ours, reps=20, warmup=2),
               max_abs_diff=max_abs_differences(names, ours(), reference),
               reference_max_abs={name: t.float().abs().max().item() for name, t in zip(names, reference)})
    difference = lambda got: max_abs_differences(names, got, reference)  # noqa: E731
    row["sweep"] = [timed_launch(launch, run, difference, sweep_reps, sweep_warmup) for launch, run in sweep]
    row["best"] = fastest(row["sweep"])
    bandwidth = f"{row['gigabytes'] / row['ours_ms']:.2f} TB/s; " if "gigabytes" in row else ""
    print(f"{label} {row.get('batch')} x {row.get('length')}: {library} {row[f'{library}_ms']:.3f} ms, ours "
          f"{row['ours_ms']:.3f} ms ({bandwidth}best swept {row['best']}), max diff {row['max_abs_diff']} of "
          f"{row['reference_max_abs']}", flush=True)
    return row


def chunked_ssd_inputs(batch: int, length: int, heads: int, head_dim: int, groups: int, state: int, chunk: int,
                       generator: torch.Generator):
    """The SSD backward kernels' common inputs as the training pass gives them, drawn from `generator`: the
    convolution's output xBC (b, l, h * p + 2 * g * n) bf16, whose x, B and C are views; dy (b, l, h, p) bf16; dt
    (b, h, c, chunk) float32, zero past the sequence's end; dA_cumsum (b, h, c, chunk), the running log decays."""
    chunks = -(-length // chunk)
    xBC = torch.randn(batch, length, heads * head_dim + 2 * groups * state, device="cuda",
                      generator=generator).to(torch.bfloat16)
    dy = torch.randn(batch, length, heads, head_dim, device="cuda", generator=generator).to(torch.bfloat16)
    dt = torch.rand(batch, heads, chunks * chunk, device="cuda", generator=generator) * 0.1
    dt[..., length:] = 0
    A = -torch.exp(torch.rand(heads, device="cuda", generator=generator))
    dA_cumsum = torch.cumsum((dt * A[:, None]).unflatten(-1, (chunks, chunk)), dim=-1)
    return xBC, dy, dt.unflatten(-1, (chunks, chunk)), dA_cumsum


def matmul_ceiling() -> float:
    """FLOP/s of a large bf16 matrix product on this card (the practical ceiling, next to the datasheet's)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    ms = median_ms(lambda: a @ b, reps=20, warmup=3)
    return 2 * 8192**3 / (ms / 1e3)


def build(name: str, max_position_embeddings: int = 65536, **overrides):
    """A preset (its fields `overrides` replaced) with random weights (seed 0) in bf16 on CUDA, in eval mode, with SDPA
    attention. `max_position_embeddings` is advisory (RoPE extrapolates) but `generate()` checks it: raised to the
    longest length a script measures."""
    config = preset_config(name, max_position_embeddings=max_position_embeddings, attn_implementation="sdpa",
                           **overrides)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = DiffuAprielForMaskedLM(config)
    return model.to(torch.bfloat16).eval()


def sharing_weights(model, model_class=DiffuAprielForMaskedLM, mixer_class=None):
    """A `model_class` holding `model`'s weights (the same tensors: no copy), in eval mode; with `mixer_class` (a
    subclass of `BidirectionalMamba2Mixer`), its bidirectional Mamba mixers are of that class. A variant of the model
    is spelled as subclasses of the library's classes and measured beside the model as built, never by patching the
    library's methods."""
    with torch.device("meta"):
        twin = model_class(model.config)
        if mixer_class is not None:
            for layer in twin.model.layers:
                if isinstance(layer.mixer, BidirectionalMamba2Mixer):
                    layer.mixer = mixer_class(model.config, layer.mixer.layer_idx)
    twin.load_state_dict(model.state_dict(), assign=True)
    twin.tie_weights()
    return twin.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Stamp results that other tools wrote (JSON objects), in place.")
    commands = parser.add_subparsers(dest="command", required=True)
    stamp = commands.add_parser("stamp", help="add the environment stamp to JSON files")
    stamp.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for path in args.files:
        stamp_file(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
