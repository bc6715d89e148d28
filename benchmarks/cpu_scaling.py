"""How the cost of one forward pass (one denoising step) grows with sequence length on the CPU, PyTorch path.

Each (config, length) runs in a fresh subprocess so that its peak resident memory is its own. Writes
benchmarks/results/cpu_scaling.json and .md (or --out).

    python benchmarks/cpu_scaling.py                       # tiny and ~50M configs, 1K..16K tokens
    python benchmarks/cpu_scaling.py --lengths 1024 2048   # a quicker look
"""

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

from harness import RESULTS, new_result, save, wall_seconds  # benchmarks/harness.py, beside this script

CONFIGS = {
    "tiny": dict(name="tiny"),
    # ~50M parameters: GPT-2 vocabulary, 6 bidirectional Mamba-2 blocks of width 512 with state size 128.
    "mamba-50m": dict(
        name="diffuapriel-240m", hidden_size=512, num_hidden_layers=6, intermediate_size=1024, mamba_d_state=128,
    ),
}


def measure(config_name: str, seqlen: int, repeats: int) -> dict:
    """Runs in the child process: build the model, time `repeats` forward passes, report the peak RSS."""
    from diffuapriel_hf import DiffuAprielForMaskedLM, preset_config

    fields = dict(CONFIGS[config_name])
    config = preset_config(fields.pop("name"), **fields)
    torch.manual_seed(0)
    model = DiffuAprielForMaskedLM(config).eval()
    ids = torch.randint(0, config.vocab_size - 1, (1, seqlen))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        model(ids[:, :256])  # warm-up
        times = wall_seconds(lambda: model(ids), repeats, warmup=0)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(
        config=config_name,
        parameters=sum(p.numel() for p in model.parameters()),
        seqlen=seqlen,
        forward_s=min(times),
        ms_per_token=1000 * min(times) / seqlen,
        peak_rss_mib=round(peak_mib, 1),
        peak_rss_growth_mib=round(peak_mib - rss_before / 1024, 1),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu_scaling", help="path stem of the .json and .md")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.repeats)))
        return

    result = new_result(rows=[])
    rows = result["rows"]
    for config_name in args.configs:
        for seqlen in args.lengths:
            child = [sys.executable, __file__, "--child", config_name, str(seqlen), "--repeats", str(args.repeats)]
            row = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    lines = [
        "CPU forward pass (PyTorch path, fp32, batch 1).",
        "",
        "| config | params | tokens | forward (s) | ms / token | peak RSS (MiB) | RSS growth (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['parameters'] / 1e6:.1f}M | {r['seqlen']} | {r['forward_s']:.3f} | "
            f"{r['ms_per_token']:.3f} | {r['peak_rss_mib']} | {r['peak_rss_growth_mib']} |"
        )
    save(result, args.out, markdown="\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
