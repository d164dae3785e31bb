"""H2: do precision schedules keep quality while running most of the work at <= 8 bits?

    python benchmarks/bench_precision.py [--pipeline pipelines/nano-sora-shapes] [--num_prompts 12]
        [--calib_prompts 8] [--steps 20] [--budget 0.5] [--threads 1]

Schedules (all emulated: exact quantize-dequantize grids on CPU, so quality is measured, speed is not):

* full precision   no switching (fp32)
* seed             `PrecisionSchedule.preset("seed")`, a sigma table: NVFP4 for sigma > 0.8, FP16 for 0.4-0.8, FP8 below 0.4
* seed_entropy     `PrecisionSchedule.preset("seed_entropy")`, an entropy gate: histogram entropy H(z_t) < 4 bits NVFP4, < 8 FP16, else FP8
* sigma            precision rising toward the end: NVFP4 > 0.8, FP8 0.4-0.8, BF16 below
* calibrated       `calibrate_pipeline` on training-split prompts (not the evaluation prompts), budget:
                   at least `--budget` of the quantizable MACs in FP8/NVFP4; stored in the pipeline
                   config and run with `precision="calibrated"`
* calibrated (mean bits)   the same profile, budget: MAC-weighted mean bit width `--matched_bits`
                   (default 10.4, what "seed" and "sigma" spend at 20 steps), for a like-for-like comparison
* static fp8 / static nvfp4   every quantizable layer at every step, as references

Metrics on held-out prompts (same seeds for every schedule): oracle accuracy (all five attributes /
mean per attribute), mean absolute pixel difference to the full-precision video of the same seed,
the fraction of steps whose rule gauge has <= 8 bits, the MAC-weighted fraction of (step, layer)
slots at <= 8 bits and the MAC-weighted mean bit width, over the quantizable layers (embeddings,
norms, the timestep/modulation path and the output projection always stay full precision).

Also printed: the Spearman correlation between the profiler's predicted per-layer error and the
measured per-layer velocity error on this model, native FP8 vs BF16 wall-clock when a CUDA GPU of
compute capability >= 8.9 is present (else why it was skipped), and the histogram entropy of z_t
along the full-precision sampling trajectory against sigma, to test the premise of the entropy gate that entropy
tracks the noise level monotonically. Single-threaded by default (the machine is shared).
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_constraints import DEFAULT_PIPELINE, load  # noqa: E402


def training_prompts(count: int, seed: int) -> list[str]:
    """Calibration prompts from the training split (disjoint from the held-out evaluation prompts)."""
    from chronos_video.data import sample_attributes

    rng = np.random.default_rng(seed + 7919)
    return [sample_attributes(rng, split="train").caption(0) for _ in range(count)]


def generate(pipe, prompts: list[str], steps: int, guidance: float, seed: int, precision, batch_size: int):
    """Videos (N, F, H, W, 3) and the per-step traces of every batch."""
    videos, traces = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed * 1000 + start + i) for i in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="np", precision=precision)
        videos.append(out.frames)
        traces.append(out.trace)
    return np.concatenate(videos), traces


def layer_macs(pipe, prompt: str) -> dict[str, float]:
    """Multiply-accumulates of each quantizable layer in one transformer call (one step)."""
    from chronos_video.precision import select_layers

    layers = select_layers(pipe.transformer)
    macs = {name: 0.0 for name in layers}
    handles = [
        module.register_forward_hook(lambda m, args, out, name=name: macs.__setitem__(name, macs[name] + out.numel() * m.in_features))
        for name, module in layers.items()
    ]
    try:
        pipe(prompt, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="latent", precision=None)
    finally:
        for handle in handles:
            handle.remove()
    return macs


def bit_usage(schedule, traces, macs: dict[str, float]) -> tuple[float, float, float]:
    """(fraction of steps with a <= 8-bit rule gauge, MAC-weighted <= 8-bit fraction, MAC-weighted mean bits)."""
    from chronos_video.precision import GAUGES

    total = sum(macs.values())
    low_steps, low_macs, bits, steps = 0, 0.0, 0.0, 0
    for trace in traces:
        for record in trace:
            decision = schedule.select(record["sigma"], record.get("entropy"))
            steps += 1
            low_steps += GAUGES[decision.gauge].bits <= 8
            for name, mac in macs.items():
                gauge = decision.layer_gauges.get(name)
                if gauge is None:
                    gauge = next((g for pattern, g in decision.layer_gauges.items() if fnmatch.fnmatchcase(name, pattern)), decision.gauge)
                low_macs += mac * (GAUGES[gauge].bits <= 8)
                bits += mac * GAUGES[gauge].bits
    return low_steps / steps, low_macs / (total * steps), bits / (total * steps)


def oracle(videos: np.ndarray, labels) -> dict[str, float]:
    from chronos_video.evaluation import ShapesOracle

    height, width = videos.shape[2:4]
    scores = ShapesOracle(height=height, width=width).score(list(videos), labels)
    return {"all": scores["all"], "mean_attr": float(np.mean([scores[a] for a in ("color", "shape", "size", "direction", "speed")]))}


def guided_subset(batch: dict, videos: int) -> dict:
    """The first `videos` videos of a recorded [uncond; cond] transformer batch (both halves)."""
    total = batch["hidden_states"].shape[0]
    half = total // 2
    videos = min(videos, half)
    index = torch.cat([torch.arange(videos), half + torch.arange(videos)])
    return {k: (v[index] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == total else v) for k, v in batch.items()}


def native_timing(pipe, prompts, steps, guidance, repeats: int = 3) -> str:
    """Native FP8 vs BF16 sampling wall-clock on a CUDA GPU with compute capability >= 8.9."""
    if not torch.cuda.is_available():
        return "Native FP8 timing skipped: no CUDA GPU on this machine (native FP8 needs compute capability >= 8.9)."
    capability = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if capability < (8, 9):
        return f"Native FP8 timing skipped: {name} has compute capability {capability[0]}.{capability[1]} < 8.9."
    from chronos_video.precision import PrecisionSchedule

    pipe.to("cuda")
    backend = pipe.config.get("precision_backend") or "emulate"
    pipe.register_to_config(precision_backend="native")
    rows = []
    try:
        for label, precision in (("fp32 (no switching)", None), ("bf16", PrecisionSchedule([], default_gauge="bf16", name="bf16")),
                                 ("fp8 (torch._scaled_mm)", PrecisionSchedule([], default_gauge="fp8", name="fp8"))):
            generate(pipe, prompts[:1], steps, guidance, 0, precision, len(prompts))  # warm-up
            times = []
            for _ in range(repeats):
                torch.cuda.synchronize()
                start = time.perf_counter()
                generate(pipe, prompts, steps, guidance, 0, precision, len(prompts))
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            rows.append((label, min(times)))
    finally:
        pipe.register_to_config(precision_backend=backend)
        pipe.to("cpu")
    base = dict(rows)["bf16"]
    lines = [f"Native wall-clock on {name} (batch {len(prompts)}, {steps} steps, best of {repeats}):", "",
             "| gauge | s / batch | speed-up vs bf16 |", "|---|---:|---:|"]
    lines += [f"| {label} | {seconds:.3f} | {base / seconds:.2f}x |" for label, seconds in rows]
    return "\n".join(lines)


@torch.no_grad()
def entropy_trajectory(pipe, prompts, steps, guidance, seed) -> tuple[list[float], dict[str, np.ndarray]]:
    """Histogram (256 bins) / differential-histogram entropy and Haar wavelet energy of z_t at each model call."""
    from chronos_video.precision import estimate_entropy
    from chronos_video.schedulers import current_sigmas

    records: list[tuple[float, torch.Tensor]] = []

    def hook(_module, args, kwargs):
        latents = kwargs["hidden_states"]
        if pipe.do_classifier_free_guidance:
            latents = latents.chunk(2)[1]
        records.append((float(current_sigmas(pipe.scheduler)[0]), latents.detach().float().clone()))

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        generators = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(len(prompts))]
        pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="latent", precision=None)
    finally:
        handle.remove()
    sigmas = [s for s, _ in records]
    values = {
        "H hist 256 bins (bits)": np.array([float(estimate_entropy(z, "histogram", bins=256).mean()) for _, z in records]),
        "H hist differential (bits)": np.array([float(estimate_entropy(z, "histogram", bins=256, differential=True).mean()) for _, z in records]),
        "Haar wavelet energy": np.array([float(estimate_entropy(z, "wavelet").mean()) for _, z in records]),
    }
    return sigmas, values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", default=DEFAULT_PIPELINE)
    parser.add_argument("--num_prompts", type=int, default=12)
    parser.add_argument("--calib_prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--budget", type=float, default=0.5, help="calibrated: fraction of quantizable MACs at <= 8 bits")
    parser.add_argument("--matched_bits", type=float, default=10.4,
                        help="second calibrated schedule: MAC-weighted mean bits (10.4 = what 'seed'/'sigma' use at 20 steps)")
    parser.add_argument("--sigma_buckets", type=float, nargs="+", default=None,
                        help="calibration buckets (default: calibration.DEFAULT_SIGMA_BUCKETS; each needs a sampling step nearest to it)")
    parser.add_argument("--check_videos", type=int, default=4, help="videos per recorded step in the profiler check")
    parser.add_argument("--batch_size", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from scipy.stats import spearmanr

    from chronos_video.data import heldout_prompts
    from chronos_video.precision import (
        DEFAULT_SIGMA_BUCKETS,
        PrecisionSchedule,
        calibrate_pipeline,
        collect_calibration_inputs,
        measure_layer_errors,
        profile_pipeline,
        ranking_agreement,
    )

    pipe = load(args.pipeline)
    num_frames, height, width = pipe.default_size
    held_out = heldout_prompts(args.num_prompts, seed=args.seed)
    prompts, labels = [p for p, _ in held_out], [a for _, a in held_out]
    print(f"## H2: precision schedules ({args.pipeline})\n")
    print(
        f"{len(prompts)} held-out prompts, {num_frames}x{height}x{width} videos, {args.steps} Euler steps, guidance {args.guidance}, "
        f"emulated gauges (exact grids, CPU), torch threads {args.threads}.\n"
    )

    # -- calibration ------------------------------------------------------------------------
    calib = training_prompts(args.calib_prompts, args.seed)
    start = time.perf_counter()
    buckets = args.sigma_buckets or DEFAULT_SIGMA_BUCKETS
    inputs = collect_calibration_inputs(pipe, calib, num_inference_steps=args.steps, sigma_buckets=buckets, guidance_scale=args.guidance, seed=args.seed)
    report = profile_pipeline(pipe, calib, guidance_scale=args.guidance, seed=args.seed, inputs=inputs)
    schedule = calibrate_pipeline(pipe, calib, budget=args.budget, report=report)  # registered: precision="calibrated"
    calib_seconds = time.perf_counter() - start
    print(
        f"Calibration: {len(calib)} training-split prompts, sigma buckets {schedule.metadata['profiled_sigmas']}, "
        f"batches per bucket {schedule.metadata['calibration']['batches_per_bucket']}, {calib_seconds:.1f} s "
        f"(sampling + profiling); budget: {args.budget:g} of the quantizable MACs at <= 8 bits.\n"
    )
    for rule in schedule.rules:
        low, high = rule.sigma_range
        counts = {}
        for gauge in rule.layer_gauges.values():
            counts[gauge] = counts.get(gauge, 0) + 1
        print(f"- sigma in ({low}, {high}]: default {rule.gauge}, overrides {counts or 'none'}")
    print()

    # profiler validity on this model: predicted vs measured per-layer velocity error
    check_inputs = {sigma: [guided_subset(batches[0], args.check_videos)] for sigma, batches in inputs.items()}
    check_report = profile_pipeline(pipe, calib, guidance_scale=args.guidance, seed=args.seed, inputs=check_inputs)
    print(
        f"Profiler check: one layer quantized at a time; one recorded step per bucket, {args.check_videos} videos; "
        "error = squared change of the guided velocity, predicted by S of the same inputs.\n"
    )
    print("| gauge | layers | Spearman(predicted S, measured) | predicted / measured (sum) |")
    print("|---|---:|---:|---:|")
    for gauge in check_report.gauges:
        names, measured = measure_layer_errors(pipe.transformer, check_inputs, gauge, guidance_scale=args.guidance)
        rho = ranking_agreement(check_report, names, measured, gauge)
        ratio = float(check_report.sensitivity[:, check_report.gauges.index(gauge)].sum() / measured.sum())
        print(f"| {gauge} | {len(names)} | {rho:.3f} | {ratio:.2f} |")
    print()

    # -- schedules ------------------------------------------------------------------------------
    schedules = {
        "full precision (fp32)": None,
        "seed": PrecisionSchedule.preset("seed"),
        "seed_entropy": PrecisionSchedule.preset("seed_entropy"),
        "sigma": PrecisionSchedule.preset("sigma"),
        f"calibrated ({args.budget:g} of MACs low-bit)": schedule,
        f"calibrated (mean {args.matched_bits:g} bits)": calibrate_pipeline(
            pipe, calib, budget=args.matched_bits, budget_kind="mean_bits", report=report, register=False
        ),
        "static fp8": PrecisionSchedule([], default_gauge="fp8", name="static_fp8"),
        "static nvfp4": PrecisionSchedule([], default_gauge="nvfp4", name="static_nvfp4"),
    }
    macs = layer_macs(pipe, prompts[0])
    reference = None
    rows = []
    for name, sched in schedules.items():
        start = time.perf_counter()
        precision = "calibrated" if sched is schedule else sched
        videos, traces = generate(pipe, prompts, args.steps, args.guidance, args.seed, precision, args.batch_size)
        seconds = (time.perf_counter() - start) / len(prompts)
        if reference is None:
            reference = videos
        scores = oracle(videos, labels)
        diff = float(np.abs(videos - reference).mean())
        if sched is None:
            steps_low, macs_low, mean_bits = 0.0, 0.0, 32.0
        else:
            steps_low, macs_low, mean_bits = bit_usage(sched, traces, macs)
        rows.append([name, f"{100 * scores['all']:.0f}%", f"{100 * scores['mean_attr']:.0f}%", f"{diff:.4f}",
                     f"{100 * steps_low:.0f}%", f"{100 * macs_low:.0f}%", f"{mean_bits:.1f}", f"{seconds:.2f}"])
        print(f"  {name}: done", file=sys.stderr, flush=True)
    header = ["schedule", "oracle all-5", "oracle mean attr", "mean |Δpixel| vs fp32", "steps ≤ 8 bit", "MACs ≤ 8 bit",
              "mean bits (MAC-weighted)", "s / video (emulated, not a speed)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()

    print(native_timing(pipe, prompts[: args.batch_size], args.steps, args.guidance))
    print()

    # -- entropy along the trajectory ----------------------------------------------------------------
    sigmas, values = entropy_trajectory(pipe, prompts[: args.batch_size], args.steps, args.guidance, args.seed)
    gate = PrecisionSchedule.preset("seed_entropy")
    print(f"Entropy of z_t along the full-precision trajectory ({min(len(prompts), args.batch_size)} held-out prompts, mean over videos):\n")
    names = list(values)
    print("| sigma | " + " | ".join(names) + " | seed_entropy gate |")
    print("|---:|" + "---:|" * len(names) + "---|")
    hist = values[names[0]]
    for i, sigma in enumerate(sigmas):
        cells = [f"{values[n][i]:.3f}" for n in names]
        print(f"| {sigma:.3f} | " + " | ".join(cells) + f" | {gate.select(sigma, float(hist[i])).gauge} |")
    print()
    print("| estimator | Spearman vs sigma | monotonic in sigma | argmin sigma |")
    print("|---|---:|---|---:|")
    for n in names:
        v = values[n]
        d = np.diff(v)
        monotonic = bool(np.all(d >= 0) or np.all(d <= 0))
        print(f"| {n} | {spearmanr(sigmas, v).statistic:.3f} | {'yes' if monotonic else 'no'} | {sigmas[int(np.argmin(v))]:.3f} |")


if __name__ == "__main__":
    main()
