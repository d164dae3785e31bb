"""Benchmark the selective scan on CPU: our chunked PyTorch path vs the plain loop vs mambapy's pscan.

    python benchmarks/bench_selective_scan.py [--lengths 256 1024 4096 16384] [--threads 1]

Problem: batch 2, d_inner 256, d_state 16, complex64 A, variable B/C (the Chronos-V setting), softplus on
delta, D skip. Each (method, L) runs in a fresh subprocess so that its peak memory is its own: the peak is
the growth of the process's maximum resident set size (ru_maxrss) over its size just before the first
call. Times are the best of `--repeats` runs after one warm-up; forward is measured under no_grad,
forward+backward with a fixed upstream gradient. The machine may be shared: compare rows of one run.

Anchors: `loop` is `selective_scan_reference` (one time step after another, plain autograd, float32);
`mambapy` is mambapy's selective-scan recipe around its Blelloch `pscan` ((B, L, D, N) layout, complex
exp) -- installed with `pip install mambapy`; its column is skipped when the package is missing. A last
check reports mambapy's gradient error against the float64 loop for complex A.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


BATCH, D_INNER, D_STATE = 2, 256, 16
METHODS = ("chronos", "loop", "mambapy")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _make_inputs(torch, length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(BATCH, D_INNER, length, generator=g)
    delta = torch.randn(BATCH, D_INNER, length, generator=g) - 2.0
    A = torch.complex(-torch.rand(D_INNER, D_STATE, generator=g) - 0.05, torch.randn(D_INNER, D_STATE, generator=g))
    # complex B/C in mamba-ssm's layout: real (batch, N, 2L), interleaved (re, im)
    B = torch.randn(BATCH, D_STATE, 2 * length, generator=g)
    C = torch.randn(BATCH, D_STATE, 2 * length, generator=g)
    D = torch.randn(D_INNER, generator=g)
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D)


def _mambapy_scan(u, delta, A, B, C, D):
    """mambapy's selective_scan recipe (mambapy/mamba.py) in its (batch, L, D, N) layout, complex A."""
    import torch
    import torch.nn.functional as F
    from mambapy.pscan import pscan

    Bc = torch.view_as_complex(B.unflatten(-1, (-1, 2)).contiguous()).transpose(1, 2)  # (batch, L, N)
    Cc = torch.view_as_complex(C.unflatten(-1, (-1, 2)).contiguous()).transpose(1, 2)
    x = u.transpose(1, 2)  # (batch, L, D)
    dt = F.softplus(delta).transpose(1, 2)
    deltaA = torch.exp(dt.unsqueeze(-1) * A)  # (batch, L, D, N)
    BX = (dt * x).unsqueeze(-1) * Bc.unsqueeze(2)
    hs = pscan(deltaA, BX)
    y = (hs @ Cc.unsqueeze(-1)).squeeze(3)  # (batch, L, D)
    return (2 * y.real + D * x).transpose(1, 2)


def _scan_fn(method: str):
    if method == "mambapy":
        return _mambapy_scan
    from chronos_video.ops import selective_scan_reference, selective_scan_torch

    fn = selective_scan_torch if method == "chronos" else selective_scan_reference
    return lambda **kw: fn(**kw, delta_softplus=True)


def worker(method: str, length: int, repeats: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    scan = _scan_fn(method)
    inputs = _make_inputs(torch, length)
    grad_out = torch.randn(BATCH, D_INNER, length, generator=torch.Generator().manual_seed(1))
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    baseline = _rss_mb()

    def forward():
        with torch.no_grad():
            scan(**inputs)

    def forward_backward():
        out = scan(**leaves)
        torch.autograd.backward(out, grad_out)
        for leaf in leaves.values():
            leaf.grad = None

    result = {}
    for name, fn in (("fwd_ms", forward), ("fwdbwd_ms", forward_backward)):
        fn()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        result[name] = best * 1e3
    result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
    return result


def mambapy_gradient_error(threads: int) -> str:
    """Relative gradient error of mambapy's recipe vs the float64 loop, complex A (small problem)."""
    import torch
    from chronos_video.ops import selective_scan_reference, selective_scan_torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    L = 64
    inputs = dict(
        u=torch.randn(1, 8, L, generator=g, dtype=torch.float64),
        delta=torch.randn(1, 8, L, generator=g, dtype=torch.float64) - 1.0,
        A=torch.complex(-torch.rand(8, 4, generator=g, dtype=torch.float64) - 0.1,
                        torch.randn(8, 4, generator=g, dtype=torch.float64)),
        B=torch.randn(1, 4, 2 * L, generator=g, dtype=torch.float64),
        C=torch.randn(1, 4, 2 * L, generator=g, dtype=torch.float64),
        D=torch.randn(8, generator=g, dtype=torch.float64),
    )
    weight = torch.randn(1, 8, L, generator=g, dtype=torch.float64)
    fns = {
        "loop": lambda **kw: selective_scan_reference(**kw, delta_softplus=True),
        "chronos": lambda **kw: selective_scan_torch(**kw, delta_softplus=True),
        "mambapy": _mambapy_scan,
    }
    grads = {}
    for name, fn in fns.items():
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        (fn(**leaves) * weight).sum().backward()
        grads[name] = {k: v.grad for k, v in leaves.items()}
    lines = []
    for name in ("chronos", "mambapy"):
        errs = {
            k: float((grads[name][k] - grads["loop"][k]).abs().max() / grads["loop"][k].abs().max())
            for k in ("u", "delta", "A", "B", "C")
        }
        lines.append(f"- {name}: max relative gradient error vs float64 loop: "
                     + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    return "\n".join(lines)


def _run_worker(method: str, length: int, repeats: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, str(length), "--repeats", str(repeats),
           "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--loop-max-length", type=int, default=4096,
                        help="longest L for the plain loop (about 6 s and 2.5 GB at 4096, growing linearly)")
    parser.add_argument("--max-projected-gb", type=float, default=6.0,
                        help="skip a config whose peak, projected linearly from a shorter measured L, exceeds this")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "L"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.repeats, args.threads)))
        return

    try:
        import mambapy.pscan  # noqa: F401

        has_mambapy = True
    except Exception:
        has_mambapy = False

    print(f"Selective scan, CPU, {args.threads} thread(s): batch {BATCH}, d_inner {D_INNER}, d_state {D_STATE}, "
          "complex64 A, variable B/C, softplus(delta), D skip.")
    print("Best of %d runs after a warm-up; peak = growth of max RSS during fwd then fwd+bwd (fresh process).\n"
          % args.repeats)
    print("| L | method | forward ms | fwd+bwd ms | peak MB | fwd+bwd speed-up vs loop | peak vs loop |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    notes = []
    last_peak = {}
    for length in args.lengths:
        rows = {}
        for method in args.methods:
            if method == "mambapy" and not has_mambapy:
                rows[method] = {"skip": "not installed (`pip install mambapy`)"}
                continue
            if method == "loop" and length > args.loop_max_length:
                rows[method] = {"skip": f"skipped: L > --loop-max-length {args.loop_max_length}"}
                continue
            if method in last_peak:
                prev_len, prev_peak = last_peak[method]
                projected = prev_peak * length / prev_len / 1024
                if projected > args.max_projected_gb:
                    rows[method] = {"skip": f"skipped: {projected:.1f} GB projected from L={prev_len} "
                                            f"> {args.max_projected_gb} GB"}
                    continue
            rows[method] = _run_worker(method, length, args.repeats, args.threads)
            if "peak_mb" in rows[method]:
                last_peak[method] = (length, rows[method]["peak_mb"])
        loop = rows.get("loop", {})
        for method in args.methods:
            r = rows[method]
            if "skip" in r or "error" in r:
                print(f"| {length} | {method} | – | – | – | – | – |")
                notes.append(f"- L={length}, {method}: {r.get('skip') or 'error: ' + r['error']}")
                continue
            speed = f"{loop['fwdbwd_ms'] / r['fwdbwd_ms']:.2f}x" if "fwdbwd_ms" in loop else "–"
            mem = f"{r['peak_mb'] / loop['peak_mb']:.2f}" if "peak_mb" in loop and loop["peak_mb"] > 0 else "–"
            print(f"| {length} | {method} | {r['fwd_ms']:.0f} | {r['fwdbwd_ms']:.0f} | {r['peak_mb']:.0f} "
                  f"| {speed} | {mem} |")
        sys.stdout.flush()
    if notes:
        print("\n" + "\n".join(notes))
    if has_mambapy:
        print("\nGradient check (batch 1, D 8, N 4, L 64, float64, complex A):")
        print(mambapy_gradient_error(args.threads))


if __name__ == "__main__":
    main()
