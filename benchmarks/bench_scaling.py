#!/usr/bin/env python
"""How Chronos-V (complex Mamba) and Nano-Sora (attention) scale with the number of video tokens.

    python benchmarks/bench_scaling.py                     # ~5-10 min on one CPU thread
    python benchmarks/bench_scaling.py --tokens 256 1024 4096 --repeats 1

Both backbones get the same width, depth, batch and tubelet size; only the token grid (frames x
height x width) grows. Each model runs in its own subprocess, sizes in increasing order, so the
growth of the process's peak resident memory (`ru_maxrss`) over its size after building the model
is the peak of the size just run (CPU has no allocator statistics like CUDA's). Reported: seconds
per forward+backward (median of the timed runs after one untimed run), peak memory,
time(16N)/time(N) (16 for linear cost, 256 for quadratic) and the crossover, if any.
A second table measures the wavelet gate at inference: the same forward with increasing shares of
all-black tubelets, gate off versus gate on (gathered mixers).

Timings on a shared machine are noisy; compare ratios within one run, not across runs.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

GRIDS = {  # tokens -> (frames, height, width) of the token grid: frames and spatial size both grow
    256: (4, 8, 8),
    512: (8, 8, 8),
    1024: (16, 8, 8),
    2048: (8, 16, 16),
    4096: (16, 16, 16),
    8192: (32, 16, 16),
    16384: (16, 32, 32),
    32768: (32, 32, 32),
    65536: (64, 32, 32),
}
PATCH = (1, 4, 4)
TEXT_TOKENS, TEXT_DIM = 8, 32


def build_model(name: str, width: int, depth: int, heads: int, **extra):
    """`extra`: more ChronosMambaModel config (ignored for Nano-Sora)."""
    from chronos_video import ChronosMambaModel, NanoSoraTransformer3DModel

    common = dict(patch_size=PATCH, hidden_size=width, num_layers=depth, num_attention_heads=heads, text_embed_dim=TEXT_DIM)
    if name == "chronos":
        return ChronosMambaModel(**common, use_wavelet_gate=False, **extra)
    if name == "chronos-gate":
        return ChronosMambaModel(**common, use_wavelet_gate=True, **extra)
    if name == "chronos-ssd":  # the chunked (state-space duality) scan, `benchmarks/bench_ssd.py`
        return ChronosMambaModel(**common, use_wavelet_gate=False, scan_type="ssd", **extra)
    if name == "chronos-ssd-shared":  # ... with one rotation for all heads (B and C turned once)
        return ChronosMambaModel(**common, use_wavelet_gate=False, scan_type="ssd", scan_rotation="shared", **extra)
    return NanoSoraTransformer3DModel(**common)


HELD_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


def held_peak_mb(fn) -> float:
    """Peak resident memory the call adds (VmHWM after a reset, minus VmRSS before), in MB (Linux).

    Run it in a process started with `HELD_MEMORY_ENV` (glibc hands every block of 64 KiB or more back to the
    OS when freed), so the peak is what the call held at once, not what the allocator kept cached.

    Freed heap pages of earlier runs (many small autograd buffers) are handed back first (`malloc_trim`), so
    the run cannot reuse resident memory that the baseline already counts.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the mmap threshold alone
        pass
    base = _status_mb("VmRSS:")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current resident set
    fn()
    return _status_mb("VmHWM:") - base


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak resident set so far; Linux reports KiB


def available_mb() -> float:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def worker(spec: dict) -> None:
    """Runs inside a fresh process: times `spec["jobs"]` in order, printing one JSON line per job.

    Scaling jobs of one model run in increasing size, so the growth of the process's peak resident
    memory over its size after building the model is the peak of the job just run (earlier, smaller
    jobs freed their memory and peaked lower).
    """
    import torch

    torch.set_num_threads(spec["threads"])
    models = {}
    baseline = None
    peaks: list[tuple[int, float]] = []
    for job in spec["jobs"]:
        name = job["model"]
        if name not in models:
            torch.manual_seed(0)  # "chronos" and "chronos-gate" get identical weights
            models[name] = build_model(name, spec["width"], spec["depth"], spec["heads"], **spec.get("chronos_config", {}))
            if spec.get("gradient_checkpointing"):  # diffusers' block-level recomputation in the backward
                models[name].enable_gradient_checkpointing()
        model = models[name]
        grid_f, grid_h, grid_w = job["grid"]
        tokens = grid_f * grid_h * grid_w
        if len(peaks) >= 2 and tokens > peaks[-1][0] > peaks[-2][0]:  # extrapolate the last growth of the peak
            (t1, p1), (t2, p2) = peaks[-2:]
            predicted = p2 * (max(p2, 1.0) / max(p1, 1.0)) ** (math.log(tokens / t2) / math.log(t2 / t1))
            if predicted > spec["memory_fraction"] * available_mb():
                print(json.dumps({"tokens": tokens, "error": f"skipped: predicted peak {predicted:.0f} MB > free memory"}), flush=True)
                continue
        video = torch.randn(1, 3, grid_f * PATCH[0], grid_h * PATCH[1], grid_w * PATCH[2], generator=torch.Generator().manual_seed(1))
        text = torch.randn(1, TEXT_TOKENS, TEXT_DIM)
        timestep = torch.tensor([500.0])
        if job["mode"] == "gate":  # inference forward, a share of the tubelet columns all black
            model.eval()
            video[..., : round(job["black"] * grid_w) * PATCH[2]] = -1.0
            timestep = torch.tensor([0.0])

            def step():
                with torch.no_grad():
                    model(video, timestep, text)
        else:
            autocast = spec.get("autocast") == "bf16"  # the training recipes' precision on CPU

            def step():
                model.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    sample = model(video, timestep, text).sample
                sample.float().square().mean().backward()

        if spec.get("held_memory"):  # a process started with HELD_MEMORY_ENV: memory only, no timing
            step()
            print(json.dumps({"tokens": tokens, "held_mb": held_peak_mb(step)}), flush=True)
            continue
        if baseline is None:
            baseline = rss_mb()
        start = time.perf_counter()
        step()  # untimed: first-touch page faults and allocator warm-up; sets the peak
        first = time.perf_counter() - start
        peak = rss_mb() - baseline
        peaks.append((tokens, peak))
        times = []
        while len(times) < spec["repeats"] and (not times or sum(times) + first < spec["budget_s"]):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        result = {"tokens": tokens, "seconds": statistics.median(times), "runs": len(times), "peak_mb": peak,
                  "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
        if job["mode"] == "gate" and getattr(model, "last_gate_stats", None):
            result["skipped"] = model.last_gate_stats["skipped_fraction"]
        print(json.dumps(result), flush=True)


def run_worker(spec: dict, timeout: float) -> list[dict]:
    """Runs `worker` in a subprocess; returns one result per job (an error entry for jobs that did not finish).
    With `spec["held_memory"]` the subprocess gets `HELD_MEMORY_ENV` and measures `held_peak_mb` instead of timing."""
    command = [sys.executable, __file__, "--worker", json.dumps(spec)]
    env = dict(os.environ, **HELD_MEMORY_ENV) if spec.get("held_memory") else None
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        stdout, failure = proc.stdout, None
        if proc.returncode != 0:
            failure = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    except subprocess.TimeoutExpired as expired:  # keep the jobs that finished before the timeout
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        failure = f"timed out after {timeout:.0f} s"
    results = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    for _ in spec["jobs"][len(results):]:
        results.append({"error": failure or "not run"})
    return results


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def scaling_table(args) -> None:
    results: dict[str, dict[int, dict]] = {}
    for name in ("chronos", "nano-sora"):
        jobs = [dict(model=name, grid=GRIDS[tokens], mode="train") for tokens in args.tokens]
        spec = dict(jobs=jobs, width=args.width, depth=args.depth, heads=args.heads, threads=args.threads, repeats=args.repeats,
                    budget_s=args.budget_s, memory_fraction=args.memory_fraction)
        results[name] = dict(zip(args.tokens, run_worker(spec, args.timeout_s)))
        for tokens, r in results[name].items():
            print(f"{name:9s} {tokens:6d} tokens {GRIDS[tokens]}: "
                  + (r.get("error") or f"{r['seconds']:.3f} s ({r['runs']} runs), peak {r['peak_mb']:.0f} MB"), file=sys.stderr)

    chronos, nano = results["chronos"], results["nano-sora"]
    print(f"\n### Forward+backward, width {args.width}, depth {args.depth}, batch 1, patch {PATCH}, {args.threads} thread(s)\n")
    params = {n: next((r["params_m"] for r in results[n].values() if "params_m" in r), None) for n in results}
    print(f"Parameters: Chronos-V {fmt(params['chronos'])} M, Nano-Sora {fmt(params['nano-sora'])} M.\n")
    print("| tokens | grid (F', H', W') | Chronos-V s | Nano-Sora s | time Chronos/Nano | Chronos-V peak MB | Nano-Sora peak MB |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for tokens in args.tokens:
        c, n = chronos.get(tokens, {}), nano.get(tokens, {})
        cs, ns = c.get("seconds"), n.get("seconds")
        ratio = cs / ns if cs and ns else None
        print(f"| {tokens} | {GRIDS[tokens]} | {fmt(cs, 3) if cs else c.get('error', '-')} | {fmt(ns, 3) if ns else n.get('error', '-')} | "
              f"{fmt(ratio)} | {fmt(c.get('peak_mb'), 0)} | {fmt(n.get('peak_mb'), 0)} |")

    print("\n| N -> 16N | Chronos-V time(16N)/time(N) | Nano-Sora time(16N)/time(N) | Chronos-V mem(16N)/mem(N) | Nano-Sora mem(16N)/mem(N) |")
    print("|---|---:|---:|---:|---:|")
    for tokens in args.tokens:
        if 16 * tokens not in args.tokens:
            continue

        def ratio(table, key):
            a, b = table.get(tokens, {}).get(key), table.get(16 * tokens, {}).get(key)
            return b / a if a and b else None

        print(f"| {tokens} -> {16 * tokens} | {fmt(ratio(chronos, 'seconds'), 1)} | {fmt(ratio(nano, 'seconds'), 1)} | "
              f"{fmt(ratio(chronos, 'peak_mb'), 1)} | {fmt(ratio(nano, 'peak_mb'), 1)} |")

    for key, label in (("seconds", "time"), ("peak_mb", "peak memory")):
        both = [t for t in args.tokens if chronos.get(t, {}).get(key) and nano.get(t, {}).get(key)]
        cheaper = [t for t in both if chronos[t][key] < nano[t][key]]
        stable = [t for t in cheaper if all(chronos[u][key] < nano[u][key] for u in both if u >= t)]
        if stable:
            print(f"\nCrossover ({label}): Chronos-V is cheaper from {min(stable)} tokens on (of those measured).")
            continue
        print(f"\nCrossover ({label}): none up to {max(both) if both else '-'} tokens; Chronos-V stays more expensive.")
        if key == "seconds" and len(both) >= 2:  # power law t = k * N^p through the two largest sizes of each model, then solve k_c N^p_c = k_n N^p_n
            small, large = both[-2:]
            exponent = {name: math.log(table[large][key] / table[small][key]) / math.log(large / small) for name, table in (("c", chronos), ("n", nano))}
            if exponent["n"] > exponent["c"]:
                crossing = large * (chronos[large][key] / nano[large][key]) ** (1 / (exponent["n"] - exponent["c"]))
                print(f"Extrapolated, not measured: local exponents {exponent['c']:.2f} (Chronos-V) and {exponent['n']:.2f} (Nano-Sora) "
                      f"between {small} and {large} tokens would cross near {crossing:,.0f} tokens.")
        if args.tokens and not nano.get(max(args.tokens), {}).get(key):
            print(f"(Nano-Sora at {max(args.tokens)} tokens: {nano.get(max(args.tokens), {}).get('error', 'not run')})")


def gate_table(args) -> None:
    tokens = args.gate_tokens
    print(f"\n### Wavelet gate at inference: forward only, {tokens} tokens {GRIDS[tokens]}, black share of the tubelets varied\n")
    print("| black tubelets | skipped by gate | gate off s | gate on s | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    jobs = [dict(model=name, grid=GRIDS[tokens], mode="gate", black=black) for black in args.gate_black for name in ("chronos", "chronos-gate")]
    spec = dict(jobs=jobs, width=args.width, depth=args.depth, heads=args.heads, threads=args.threads, repeats=args.repeats,
                budget_s=args.budget_s, memory_fraction=1.0)
    results = run_worker(spec, args.timeout_s)
    for index, black in enumerate(args.gate_black):
        off, on = results[2 * index], results[2 * index + 1]
        off_s, on_s, skipped = off.get("seconds"), on.get("seconds"), on.get("skipped")
        print(f"| {black:.0%} | {fmt(None if skipped is None else 100 * skipped, 1)}% | {fmt(off_s, 3)} | {fmt(on_s, 3)} | "
              f"{fmt(off_s / on_s if off_s and on_s else None)}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[t for t in sorted(GRIDS) if t <= 16384], choices=sorted(GRIDS))
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (fewer when over --budget_s)")
    parser.add_argument("--budget_s", type=float, default=20.0, help="stop repeating a configuration after this many seconds")
    parser.add_argument("--timeout_s", type=float, default=480.0, help="give up on one model's sizes after this long")
    parser.add_argument("--memory_fraction", type=float, default=0.7, help="skip a size whose extrapolated peak exceeds this share of free RAM")
    parser.add_argument("--gate_tokens", type=int, default=4096, choices=sorted(GRIDS))
    parser.add_argument("--gate_black", type=float, nargs="*", default=[0.0, 0.5, 0.75], help="shares of all-black tubelet columns")
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    args.tokens = sorted(set(args.tokens))
    started = time.perf_counter()
    scaling_table(args)
    if args.gate_black:
        gate_table(args)
    print(f"\n(total {time.perf_counter() - started:.0f} s; shared machine, timings are noisy)")


if __name__ == "__main__":
    main()
