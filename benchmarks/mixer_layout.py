"""How the two directions of a bidirectional Mamba-2 mixer share kernel launches, decided by measurement.

Times one `BidirectionalMamba2Mixer` forward (bf16, batch 1, the 1.3B presets' sizes: d_model 2048, 64 heads of 64,
state 128) in three layouts, eagerly and replayed from a CUDA graph (as `generate()` runs its steps):

- `stacked`:  both directions' conv inputs concatenated on channels, one convolution, the heads concatenated, one
              SSD call with 2H heads (two copies of the in_proj outputs);
- `cat_once`: one concatenation that orders the conv channels [x_fwd | x_bwd | B_fwd | B_bwd | C_fwd | C_bwd], so the
              SSD inputs of both directions are views of one convolution output (one copy);
- `separate`: one convolution and one SSD call per direction on views of its in_proj output (no copy).

    python benchmarks/mixer_layout.py --out benchmarks/results/mixer_layout.json
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from diffuapriel_hf import preset_config
from diffuapriel_hf.modeling.modeling_diffuapriel import BidirectionalMamba2Mixer
from diffuapriel_hf.modeling.mamba_ops import kernel_ops
from harness import median_ms, new_result, save  # benchmarks/harness.py, beside this script


def _dt(mixer, dt_raw):
    return F.softplus(dt_raw.float() + mixer.dt_bias.float())  # (B, L, H)


def _gated_norm_and_out_proj(mixers, ops, y, gates):
    """The tail both stacked layouts share: each direction's gated RMSNorm and out_proj, the second reversed back."""
    batch, seqlen, d = gates[0].shape
    outs = []
    for mixer, y_dir, z in zip(mixers, y.split(mixers[0].num_heads, dim=2), gates):
        y_dir = ops.rmsnorm(y_dir.reshape(batch, seqlen, d), mixer.norm.weight, None, z=z,
                            eps=mixer.norm.variance_epsilon, group_size=d // mixer.n_groups, norm_before_gate=False)
        outs.append(mixer.out_proj(y_dir))
    return outs[0] + outs[1].flip(1)


def _sizes(m):
    f = m.left_to_right
    return m.directions(), f, f.num_heads, f.head_dim, f.n_groups, f.ssm_state_size, f.intermediate_size


def stacked(m, ops, h):
    mixers, f, H, P, G, N, d = _sizes(m)
    batch, seqlen, _ = h.shape
    gates, conv_in, dts = [], [], []
    for mixer, inp in zip(mixers, (h, h.flip(1))):
        z, xBC, dt = mixer.in_proj(inp).split([d, mixer.conv_dim, H], dim=-1)
        gates.append(z), conv_in.append(xBC), dts.append(_dt(mixer, dt))
    w = torch.cat([mx.conv1d.weight.squeeze(1) for mx in mixers])
    b = torch.cat([mx.conv1d.bias for mx in mixers])
    xBC = ops.causal_conv1d(torch.cat(conv_in, -1).transpose(1, 2), w, b, activation="silu").transpose(1, 2)
    xs, Bs, Cs = [], [], []
    for part in xBC.split(f.conv_dim, dim=-1):
        x, B, C = part.split([d, G * N, G * N], dim=-1)
        xs.append(x.reshape(batch, seqlen, H, P)), Bs.append(B.reshape(batch, seqlen, G, N))
        Cs.append(C.reshape(batch, seqlen, G, N))
    y = ops.chunk_scan(torch.cat(xs, 2), torch.cat(dts, 2), torch.cat([-torch.exp(mx.A_log.float()) for mx in mixers]),
                       torch.cat(Bs, 2), torch.cat(Cs, 2), f.chunk_size, D=torch.cat([mx.D for mx in mixers]).float())
    return _gated_norm_and_out_proj(mixers, ops, y, gates)


def cat_once(m, ops, h):
    mixers, f, H, P, G, N, d = _sizes(m)
    batch, seqlen, _ = h.shape
    gates, parts, dts = [], [], []
    for mixer, inp in zip(mixers, (h, h.flip(1))):
        z, x, B, C, dt = mixer.in_proj(inp).split([d, d, G * N, G * N, H], dim=-1)
        gates.append(z), parts.append((x, B, C)), dts.append(_dt(mixer, dt))
    order = [p[i] for i in range(3) for p in parts]  # x_f, x_b, B_f, B_b, C_f, C_b
    ws = [mx.conv1d.weight.squeeze(1).split([d, G * N, G * N]) for mx in mixers]
    bs = [mx.conv1d.bias.split([d, G * N, G * N]) for mx in mixers]
    w = torch.cat([wi[i] for i in range(3) for wi in ws])
    b = torch.cat([bi[i] for i in range(3) for bi in bs])
    xBC = ops.causal_conv1d(torch.cat(order, -1).transpose(1, 2), w, b, activation="silu").transpose(1, 2)
    x, B, C = xBC.split([2 * d, 2 * G * N, 2 * G * N], dim=-1)
    y = ops.chunk_scan(x.reshape(batch, seqlen, 2 * H, P), torch.cat(dts, 2),
                       torch.cat([-torch.exp(mx.A_log.float()) for mx in mixers]),
                       B.reshape(batch, seqlen, 2 * G, N), C.reshape(batch, seqlen, 2 * G, N), f.chunk_size,
                       D=torch.cat([mx.D for mx in mixers]).float())
    return _gated_norm_and_out_proj(mixers, ops, y, gates)


def separate(m, ops, h):
    """The layout `BidirectionalMamba2Mixer.forward` ships (it picks the kernels itself)."""
    return m(h)


LAYOUTS = {"stacked": stacked, "cat_once": cat_once, "separate": separate}


def time_ms(fn, graphed, reps=20):
    """Median milliseconds of `fn()`, launched eagerly or replayed from a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    if graphed:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        fn = graph.replay
    return median_ms(fn, reps=reps, warmup=0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    ops = kernel_ops()
    if ops is None:
        raise SystemExit("mamba-ssm is not installed")
    result = new_result(rows=[])
    torch.manual_seed(0)
    config = preset_config("diffuapriel-1.3b")
    with torch.device("cuda"):
        mixer = BidirectionalMamba2Mixer(config, 0).to(torch.bfloat16)
    for p in mixer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    with torch.no_grad():
        for mx in mixer.directions():
            mx.A_log.copy_(torch.log(torch.arange(1, mx.num_heads + 1, device="cuda", dtype=torch.float32)))
            mx.dt_bias.fill_(-3.0)
    rows = result["rows"]
    with torch.no_grad():
        for seqlen in args.lengths:
            h = torch.randn(1, seqlen, config.hidden_size, device="cuda", dtype=torch.bfloat16)
            ref = separate(mixer, ops, h).float()
            for name, fn in LAYOUTS.items():
                out = fn(mixer, ops, h).float()
                err = ((out - ref).norm() / ref.norm()).item()
                row = dict(layout=name, seqlen=seqlen, rel_err_vs_separate=err,
                           eager_ms=time_ms(lambda: fn(mixer, ops, h), graphed=False),
                           graph_ms=time_ms(lambda: fn(mixer, ops, h), graphed=True))
                rows.append(row)
                print(f"{name:9s} L={seqlen:6d} eager {row['eager_ms']:7.3f} ms  graph {row['graph_ms']:7.3f} ms  "
                      f"rel err {err:.1e}", flush=True)
    save(result, args.out)


if __name__ == "__main__":
    main()
