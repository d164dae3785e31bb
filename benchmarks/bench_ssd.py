#!/usr/bin/env python
"""The SSD (chunked, matmul) complex scan against the selective scan and the sequential loop, and the
whole Chronos-V model with either scan against Nano-Sora's attention.

    python benchmarks/bench_ssd.py                       # both tables, L / tokens up to 64k (long: run it alone)
    python benchmarks/bench_ssd.py --mode op --lengths 1024 4096 16384 65536
    python benchmarks/bench_ssd.py --mode model --tokens 256 1024 4096 16384 65536
    python benchmarks/bench_ssd.py --quick               # seconds: proves the script runs (used by the tests)

Scan op (`--mode op`): one Chronos-V mixer's worth of scan, batch 1, `--heads` x `--head_dim` channels and
`--state_size` complex states; the SSD form shares the decay within a head, the selective scan has one per
channel and state (the same state count, its own elementwise recurrence), the loop is the float64-free
sequential recurrence `complex_ssd_scan_reference` (capped at `--loop_max_length`). Forward is timed under
`torch.no_grad`, forward+backward with gradients for every input. Peak memory is the growth of the
process's peak resident set (`VmHWM`, reset through /proc/self/clear_refs before each run) over its
resident set before the run, in a worker whose glibc returns every large block to the OS
(MALLOC_MMAP_THRESHOLD_) and trims its heap before each run (`malloc_trim`), so it measures what the run
itself held (Linux only). bf16 rows give bf16 inputs: the SSD
scan runs its matmuls in bf16 (decays in float32); the selective scan and the loop compute in float32.

Whole model (`--mode model`): Chronos-V (SSD scan with per-head or shared rotation, selective scan; no wavelet gate) and Nano-Sora at the same
width, depth and tubelet size, forward+backward (float32, or `--autocast bf16` as the training recipes; with
`--gradient_checkpointing` every model recomputes its blocks in the backward, and Chronos-V's mixers, inside a
block, each scan order), through `bench_scaling.py`'s worker (peak = growth of `ru_maxrss`, which also counts what
glibc keeps cached; `--held_memory` adds the memory one step holds at once, measured as for the op):
time(16N)/time(N) and the measured crossover.

Timings on a shared machine are noisy; compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scaling  # noqa: E402  (its worker and token grids)

METHODS = ("ssd", "selective", "loop")
MODEL_NAMES = {"chronos-ssd": "Chronos-V ssd", "chronos-ssd-shared": "Chronos-V ssd, shared rotation",
               "chronos": "Chronos-V selective", "nano-sora": "Nano-Sora"}


# ----------------------------------------------------------------------------------------------------
# Scan op
# ----------------------------------------------------------------------------------------------------


def _op_call(method: str, length: int, dtype_name: str, spec: dict):
    """(forward, inputs that take gradients) of one scan configuration."""
    import torch

    from chronos_video.ops import complex_ssd_scan, complex_ssd_scan_reference, selective_scan

    dtype = getattr(torch, dtype_name)
    heads, head_dim, n = spec["heads"], spec["head_dim"], spec["state_size"]
    g = torch.Generator().manual_seed(0)
    if method == "selective":
        channels = heads * head_dim
        leaves = dict(
            u=torch.randn(1, channels, length, generator=g).to(dtype),
            delta=torch.randn(1, channels, length, generator=g) * 0.5 - 2.0,
            A=torch.complex(-torch.rand(channels, n, generator=g) - 0.1, torch.randn(channels, n, generator=g)),
            B=torch.randn(1, n, 2 * length, generator=g).to(dtype),
            C=torch.randn(1, n, 2 * length, generator=g).to(dtype),
            D=torch.randn(channels, generator=g),
        )
        return (lambda t: selective_scan(**t, delta_softplus=True)), leaves
    leaves = dict(
        x=torch.randn(1, length, heads, head_dim, generator=g).to(dtype),
        dt=torch.randn(1, length, heads, generator=g) * 0.5 - 2.0,
        A=-torch.rand(heads, generator=g) - 0.1,
        B=torch.randn(1, length, 1, 2 * n, generator=g).to(dtype),
        C=torch.randn(1, length, 1, 2 * n, generator=g).to(dtype),
        omega=torch.randn(heads, n, generator=g),
        D=torch.randn(heads, head_dim, generator=g),
    )
    phase = torch.randn(1, length, n, generator=g)
    if method == "ssd":
        return (lambda t: complex_ssd_scan(**t, phase=phase, chunk_size=spec["chunk_size"], dt_softplus=True)), leaves
    return (lambda t: complex_ssd_scan_reference(**t, phase=phase, dt_softplus=True)), leaves


def op_worker(spec: dict) -> None:
    """Runs in a fresh process: times every job of `spec["jobs"]`, one JSON line each."""
    import torch

    torch.set_num_threads(spec["threads"])
    for job in spec["jobs"]:
        fn, leaves = _op_call(job["method"], job["length"], job["dtype"], spec)
        leaves = {k: v.requires_grad_(True) for k, v in leaves.items()}

        def forward():
            with torch.no_grad():
                fn(leaves)

        def train():
            for leaf in leaves.values():
                leaf.grad = None
            fn(leaves).float().square().mean().backward()

        peak = bench_scaling.held_peak_mb(train)  # also the untimed warm-up
        result = dict(job)
        for name, step in (("forward_s", forward), ("train_s", train)):
            times = []
            while len(times) < spec["repeats"] and (not times or sum(times) < spec["budget_s"]):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            result[name] = statistics.median(times)
        result["peak_mb"] = peak
        print(json.dumps(result), flush=True)


def _run(command: list[str], jobs: list, timeout: float, env: dict | None = None) -> list[dict]:
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        stdout, failure = proc.stdout, None
        if proc.returncode != 0:
            failure = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    except subprocess.TimeoutExpired as expired:
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        failure = f"timed out after {timeout:.0f} s"
    results = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return results + [{"error": failure or "not run"} for _ in jobs[len(results):]]


def fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def op_table(args) -> None:
    jobs = [dict(method=m, length=n, dtype=d) for d in args.dtypes for n in args.lengths for m in args.methods
            if not (m == "loop" and n > args.loop_max_length)]
    spec = dict(jobs=jobs, threads=args.threads, repeats=args.repeats, budget_s=args.budget_s, heads=args.heads,
                head_dim=args.head_dim, state_size=args.state_size, chunk_size=args.chunk_size)
    env = dict(os.environ, **bench_scaling.HELD_MEMORY_ENV, OMP_NUM_THREADS=str(args.threads))
    results = _run([sys.executable, __file__, "--op-worker", json.dumps(spec)], jobs, args.timeout_s, env)
    table = {(j["method"], j["length"], j["dtype"]): r for j, r in zip(jobs, results)}

    print(f"\n### Scan op: batch 1, {args.heads} heads x {args.head_dim} channels, {args.state_size} complex states, "
          f"SSD chunk {args.chunk_size}, {args.threads} thread(s)\n")
    print("| L | dtype | method | forward s | fwd+bwd s | peak MB (fwd+bwd) | fwd+bwd speed-up over selective |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for dtype in args.dtypes:
        for length in args.lengths:
            base = table.get(("selective", length, dtype), {}).get("train_s")
            for method in args.methods:
                r = table.get((method, length, dtype))
                if r is None:
                    continue
                if "error" in r:
                    print(f"| {length} | {dtype} | {method} | {r['error']} | | | |")
                    continue
                speed = f"{base / r['train_s']:.2f}x" if base and method != "selective" else "-"
                print(f"| {length} | {dtype} | {method} | {fmt(r['forward_s'])} | {fmt(r['train_s'])} | {fmt(r['peak_mb'], 1)} | {speed} |")


# ----------------------------------------------------------------------------------------------------
# Whole model
# ----------------------------------------------------------------------------------------------------


def model_table(args) -> None:
    results: dict[str, dict[int, dict]] = {}
    for name in args.models:
        jobs = [dict(model=name, grid=bench_scaling.GRIDS[tokens], mode="train") for tokens in args.tokens]
        spec = dict(jobs=jobs, width=args.width, depth=args.depth, heads=args.attention_heads, threads=args.threads,
                    repeats=args.repeats, budget_s=args.budget_s, memory_fraction=args.memory_fraction, autocast=args.autocast,
                    gradient_checkpointing=args.gradient_checkpointing, chronos_config={"num_scan_orders": args.scan_orders})
        results[name] = dict(zip(args.tokens, bench_scaling.run_worker(spec, args.timeout_s)))
        if args.held_memory:  # a second process: memory held at once, measured as the op table measures it
            held = bench_scaling.run_worker(dict(spec, held_memory=True), args.timeout_s)
            for tokens, row in zip(args.tokens, held):
                results[name][tokens]["held_mb"] = row.get("held_mb")

    names = list(args.models)
    print(f"\n### Whole model, forward+backward: width {args.width}, depth {args.depth}, batch 1, patch {bench_scaling.PATCH}, "
          f"{args.threads} thread(s), {'bf16 autocast' if args.autocast == 'bf16' else 'float32'}"
          f"{', gradient checkpointing (blocks; Chronos-V also per scan order)' if args.gradient_checkpointing else ''}"
          f"{f', Chronos-V with {args.scan_orders} scan orders' if args.scan_orders != 4 else ''}\n")
    memory = [("peak_mb", "peak MB")] + ([("held_mb", "held MB")] if args.held_memory else [])
    print("| tokens | " + " | ".join(f"{MODEL_NAMES[n]} s" for n in names) + " | "
          + " | ".join(f"{MODEL_NAMES[n]} {label}" for _, label in memory for n in names) + " |")
    print("|---:|" + "---:|" * ((1 + len(memory)) * len(names)))
    for tokens in args.tokens:
        cells = [fmt(results[n][tokens].get("seconds")) if "seconds" in results[n][tokens] else results[n][tokens].get("error", "-")
                 for n in names]
        peaks = [fmt(results[n][tokens].get(key), 0) for key, _ in memory for n in names]
        print(f"| {tokens} | " + " | ".join(cells) + " | " + " | ".join(peaks) + " |")

    ratios = [t for t in args.tokens if 16 * t in args.tokens]
    if ratios:
        print("\n| N -> 16N | " + " | ".join(f"{MODEL_NAMES[n]} time(16N)/time(N)" for n in names) + " |")
        print("|---|" + "---:|" * len(names))
        for tokens in ratios:
            cells = []
            for n in names:
                a, b = results[n][tokens].get("seconds"), results[n][16 * tokens].get("seconds")
                cells.append(fmt(b / a if a and b else None, 1))
            print(f"| {tokens} -> {16 * tokens} | " + " | ".join(cells) + " |")

    if "nano-sora" in results:
        nano = results["nano-sora"]
        for name in (n for n in names if n != "nano-sora"):
            mine = results[name]
            both = [t for t in args.tokens if mine[t].get("seconds") and nano[t].get("seconds")]
            faster = [t for t in both if all(mine[u]["seconds"] < nano[u]["seconds"] for u in both if u >= t)]
            if faster:
                print(f"\nCrossover: {MODEL_NAMES[name]} is faster than Nano-Sora from {min(faster)} tokens on (of those measured).")
            else:
                print(f"\nCrossover: none for {MODEL_NAMES[name]} up to {max(both) if both else '-'} tokens.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("op", "model", "both"), default="both")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: checks that the script runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget_s", type=float, default=30.0, help="stop repeating a configuration after this many seconds")
    parser.add_argument("--timeout_s", type=float, default=3600.0, help="give up on one worker after this long")
    op = parser.add_argument_group("scan op")
    op.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    op.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"])
    op.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    op.add_argument("--loop_max_length", type=int, default=16384, help="the sequential loop only up to this L")
    op.add_argument("--heads", type=int, default=8)
    op.add_argument("--head_dim", type=int, default=16)
    op.add_argument("--state_size", type=int, default=16)
    op.add_argument("--chunk_size", type=int, default=32)
    model = parser.add_argument_group("whole model")
    model.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096, 16384, 65536], choices=sorted(bench_scaling.GRIDS))
    model.add_argument("--models", nargs="+", choices=tuple(MODEL_NAMES), default=list(MODEL_NAMES))
    model.add_argument("--width", type=int, default=64)
    model.add_argument("--depth", type=int, default=2)
    model.add_argument("--attention_heads", type=int, default=2)
    model.add_argument("--autocast", choices=("none", "bf16"), default="none", help="bf16: CPU autocast, as the training recipes")
    model.add_argument("--gradient_checkpointing", action="store_true",
                       help="enable_gradient_checkpointing(): every model recomputes its blocks in the backward, Chronos-V also each scan order: less memory, more time")
    model.add_argument("--scan_orders", type=int, choices=(1, 2, 4), default=4, help="Chronos-V's scan orders per block")
    model.add_argument("--held_memory", action="store_true",
                       help="also measure, in a second process per model, the memory a step holds at once (as the op table: "
                            "VmHWM with glibc returning freed blocks; ru_maxrss also counts what the allocator keeps cached)")
    model.add_argument("--memory_fraction", type=float, default=0.7, help="skip a size whose extrapolated peak exceeds this share of free RAM")
    parser.add_argument("--op-worker", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.op_worker:
        op_worker(json.loads(args.op_worker))
        return
    if args.quick:
        args.lengths, args.repeats, args.loop_max_length = [256, 512], 1, 512
        args.heads, args.head_dim, args.state_size, args.chunk_size = 2, 8, 4, 32
        args.tokens, args.width, args.depth = [256], 32, 1
    args.lengths, args.tokens = sorted(set(args.lengths)), sorted(set(args.tokens))
    started = time.perf_counter()
    if args.mode in ("op", "both"):
        op_table(args)
    if args.mode in ("model", "both"):
        model_table(args)
    print(f"\n(total {time.perf_counter() - started:.0f} s; shared machine, timings are noisy)")


if __name__ == "__main__":
    main()
