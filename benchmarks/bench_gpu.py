#!/usr/bin/env python
"""The GPU half of issue 14 in one run: mamba-ssm's SSD kernel against our PyTorch scan, and the seed's
memory claim (Chronos-V vs attention at 8 frames).

    python benchmarks/bench_gpu.py                  # on a CUDA machine, about a minute
    python benchmarks/bench_gpu.py --quick          # tiny sizes; on a CPU it runs the model table only
    python benchmarks/bench_gpu.py --json out.json  # also write every row as JSON

Scan op (needs CUDA and mamba-ssm's `mamba_chunk_scan_combined`): the real SSD scan of one mixer (batch 1,
`--heads` x `--head_dim` channels, `--state_size` states) through the kernel and through our chunked PyTorch
path on the same GPU tensors: forward and forward+backward milliseconds (CUDA events, median), and the
largest relative error of the output and of every input gradient between the two paths.

Whole model: Chronos-V (SSD scan, per-head and shared rotation) and Nano-Sora at the same width, depth and
tubelet size, 8 frames, growing frame size, forward+backward under bf16 autocast (the training recipe):
milliseconds and peak allocated GPU memory (`torch.cuda.max_memory_allocated`, weights included). The seed
claims ~3.2 GB (Mamba) vs ~7.8 GB (transformer) at 8 frames on a 4 GB card, without a resolution or width;
this table measures the ratio at several resolutions instead of copying the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scaling import PATCH, build_model  # noqa: E402

from chronos_video.ops.ssd_scan import _ssd_torch, has_mamba_ssd_kernel, ssd_scan  # noqa: E402


def timed_ms(fn, repeats: int, device: torch.device) -> float:
    """Median milliseconds of `fn()` after one warm-up call (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - began))
    return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def scan_inputs(length: int, heads: int, head_dim: int, state: int, dtype: torch.dtype, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    inputs = dict(x=randn(1, length, heads, head_dim), dt=randn(1, length, heads) * 0.5 - 1.0,
                  A=-(torch.rand(heads, generator=g) + 0.1), B=randn(1, length, 1, state), C=randn(1, length, 1, state))
    return {k: (v.to(device, dtype) if k in ("x", "B", "C") else v.to(device)) for k, v in inputs.items()}


def scan_table(args, device: torch.device) -> list[dict]:
    rows = []
    paths = {"kernel": lambda **kw: ssd_scan(**kw, chunk_size=args.chunk_size, dt_softplus=True),
             "ours": lambda **kw: _ssd_torch(chunk_size=args.chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                                            dt_softplus=True, return_final_states=False, **kw)}
    for dtype in (torch.float32, torch.bfloat16):
        for length in args.lengths:
            base = scan_inputs(length, args.heads, args.head_dim, args.state_size, dtype, device)
            row = {"table": "scan", "dtype": str(dtype).replace("torch.", ""), "length": length}
            results = {}
            for name, fn in paths.items():
                leaves = {k: v.clone().requires_grad_(True) for k, v in base.items()}
                out = fn(**leaves)
                grads = torch.autograd.grad(out.float().square().sum(), list(leaves.values()))
                results[name] = (out.detach(), grads)
                with torch.no_grad():
                    row[f"{name}_fwd_ms"] = timed_ms(lambda: fn(**base), args.repeats, device)

                def fwd_bwd():
                    leaves = {k: v.clone().requires_grad_(True) for k, v in base.items()}
                    torch.autograd.grad(fn(**leaves).float().square().sum(), list(leaves.values()))

                row[f"{name}_fwdbwd_ms"] = timed_ms(fwd_bwd, args.repeats, device)
            row["out_rel_err"] = rel_err(results["kernel"][0], results["ours"][0])
            row["grad_rel_err_max"] = max(rel_err(a, b) for a, b in zip(results["kernel"][1], results["ours"][1]))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def model_table(args, device: torch.device) -> list[dict]:
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = build_model(name, args.width, args.depth, args.attention_heads).to(device)
        for size in args.sizes:
            video = torch.randn(args.batch, 3, 8, size, size, device=device)
            text, timestep = torch.randn(args.batch, 8, 32, device=device), torch.full((args.batch,), 500.0, device=device)
            tokens = (8 // PATCH[0]) * (size // PATCH[1]) * (size // PATCH[2])  # per clip
            row = {"table": "model", "model": name, "frames": 8, "size": size, "tokens": tokens}

            def step():
                model.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    sample = model(video, timestep, text).sample
                sample.float().square().mean().backward()

            try:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                row["fwdbwd_ms"] = timed_ms(step, args.repeats, device)
                if device.type == "cuda":
                    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            model.zero_grad(set_to_none=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=16)
    parser.add_argument("--state_size", type=int, default=16, help="real states (mamba-ssm's N; our complex scan folds N/2 pairs)")
    parser.add_argument("--chunk_size", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=["chronos-ssd", "chronos-ssd-shared", "nano-sora"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512], help="frame sizes (px) at 8 frames")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--attention_heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="write all rows to this file")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.sizes, args.repeats = [256], [32], 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = {"table": "env", "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "mamba_ssd_kernel": has_mamba_ssd_kernel()}
    print(json.dumps(info), flush=True)
    rows = [info]
    if device.type == "cuda" and has_mamba_ssd_kernel():
        rows += scan_table(args, device)
    else:
        print("scan table skipped: needs a CUDA GPU and mamba-ssm's Triton SSD kernel", flush=True)
    rows += model_table(args, device)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
