#!/usr/bin/env python
"""Training throughput and model-FLOP utilisation (MFU) of a training config's backbone.

    python benchmarks/train_throughput.py                       # training/configs/nano_sora_shapes.yaml
    python benchmarks/train_throughput.py --steps 3 --threads 2 --mixed-precision no
    python benchmarks/train_throughput.py --config training/configs/smoke.yaml --device cuda

The backbone that `training/train.py` would build from `--config` runs real training steps
(autocast forward, MSE on the rectified-flow velocity target, backward, gradient clipping,
AdamW) on random inputs of the training shape, side by side with a diffusers
`LatteTransformer3DModel` of the same width, depth, heads and spatial patch. Steps of the two
models alternate, so load from other processes hits both alike; the median step time gives
samples/s. FLOPs per sample are counted with `torch.utils.flop_counter.FlopCounterMode` on one
forward+backward (not estimated from parameter counts), and MFU divides the achieved FLOP/s
by the peak matmul FLOP/s measured here, in the training dtype and thread count.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import LatteTransformer3DModel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from chronos_video.flow_matching import flow_matching_loss, rectified_flow_inputs, sample_flow_sigmas, sigmas_to_timesteps
from chronos_video.training_builders import build_backbone
from chronos_video.training_config import parse_config

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "training" / "configs" / "nano_sora_shapes.yaml"
aten = torch.ops.aten


# ----------------------------------------------------------------------------- configuration


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="training YAML (model and data settings are read from it)")
    parser.add_argument("--steps", type=_positive_int, default=5, help="timed training steps per model (median reported)")
    parser.add_argument("--warmup-steps", type=_non_negative_int, default=1, help="untimed steps per model first")
    parser.add_argument("--batch-size", type=_positive_int, default=None, help="default: the config's train_batch_size")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch intra-op threads (default: torch's current setting)")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default=None, help="default: the config's mixed_precision")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto picks CUDA when available")
    parser.add_argument("--peak-size", type=_positive_int, default=None, help="square matmul size for the peak (default 2048 on CPU, 8192 on CUDA)")
    parser.add_argument("--peak-repeats", type=_positive_int, default=5, help="best of this many peak matmuls")
    return parser.parse_args(argv)


def load_train_config(path: Path):
    """The config exactly as `training/train.py` reads it: its defaults, the YAML on top, validated."""
    if not path.is_file():
        raise ValueError(f"`--config` must be an existing YAML file, got {str(path)!r}.")
    return parse_config(["--config", str(path)])


# ----------------------------------------------------------------------------- models and inputs


@dataclass
class Candidate:
    """A backbone under test and how to call it on the shared batch."""

    name: str
    model: torch.nn.Module
    forward: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    tokens_per_sample: int
    optimizer: torch.optim.Optimizer | None = None
    step_seconds: list[float] = field(default_factory=list)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def build_candidates(config) -> list[Candidate]:
    """The config's backbone and a diffusers Latte with matching width, depth, heads and spatial patch."""
    torch.manual_seed(config.seed)
    model = build_backbone(config)  # the backbone `training/train.py` builds for a fresh run
    mc = model.config
    for key in ("in_channels", "hidden_size", "num_layers", "num_attention_heads", "patch_size", "sample_frames", "sample_height", "sample_width"):
        if key not in mc:
            raise ValueError(f"architecture {config.architecture!r} has no `{key}` in its config; the Latte reference needs it.")
    pt, ph, pw = (mc.patch_size,) * 3 if isinstance(mc.patch_size, int) else tuple(mc.patch_size)
    if ph != pw:
        raise ValueError(f"Latte patchifies square patches only; the config's `model.patch_size` has h={ph} != w={pw}.")
    frames, height, width = mc.sample_frames, mc.sample_height, mc.sample_width
    text_dim = config.text_encoder.get("d_model", 128)

    # Latte-1's own block settings (ada_norm_single, gelu-approximate MLP, biased attention), shrunk to
    # the config's size. One Latte "layer" is a spatial block (with text cross-attention) plus a
    # temporal block, and its patches are per frame, so it sees `pt` times more tokens.
    reference = LatteTransformer3DModel(
        num_attention_heads=mc.num_attention_heads,
        attention_head_dim=mc.hidden_size // mc.num_attention_heads,
        in_channels=mc.in_channels,
        out_channels=mc.in_channels,
        num_layers=mc.num_layers,
        cross_attention_dim=mc.hidden_size,
        attention_bias=True,
        sample_size=height,
        patch_size=ph,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=text_dim,
        video_length=frames,
    )

    def call_config_model(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return module(
            hidden_states=batch["noisy"], timestep=batch["timestep"], encoder_hidden_states=batch["text"],
            encoder_attention_mask=batch["text_mask"], return_dict=False,
        )[0]

    def call_latte(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Latte repeats the text per frame without expanding a (B, S) mask, and its pipeline passes
        # none, so the reference attends to all text tokens.
        return module(hidden_states=batch["noisy"], timestep=batch["timestep"], encoder_hidden_states=batch["text"], return_dict=False)[0]

    spatial = (height // ph) * (width // pw)
    return [
        Candidate(f"{type(model).__name__} ({config.architecture})", model, call_config_model, (frames // pt) * spatial),
        Candidate("diffusers LatteTransformer3DModel", reference, call_latte, frames * spatial),
    ]


def make_batch(config, model_config, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random inputs of the training shape, built the way `training/train.py` builds a batch."""
    generator = torch.Generator().manual_seed(config.seed)
    shape = (model_config.in_channels, model_config.sample_frames, model_config.sample_height, model_config.sample_width)
    clip = torch.rand(batch_size, *shape, generator=generator) * 2 - 1  # random pixels in [-1, 1]
    noise = torch.randn(clip.shape, generator=generator)
    sigmas = sample_flow_sigmas(
        batch_size, generator, config.weighting_scheme, config.logit_mean, config.logit_std, config.mode_scale,
        shift=float(config.scheduler.get("shift", 1.0)),
    )
    noisy, target = rectified_flow_inputs(clip, sigmas, noise)
    text_len, text_dim = config.tokenizer_max_length, config.text_encoder.get("d_model", 128)
    lengths = torch.randint(1, text_len + 1, (batch_size, 1), generator=generator)
    batch = {
        "noisy": noisy,
        "target": target,
        "timestep": sigmas_to_timesteps(sigmas),
        "text": torch.randn(batch_size, text_len, text_dim, generator=generator),
        "text_mask": torch.arange(text_len)[None] < lengths,
    }
    return {name: value.to(device) for name, value in batch.items()}


# ----------------------------------------------------------------------------- measurement


def _autocast(device: torch.device, mixed_precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_backward(candidate: Candidate, batch: dict[str, torch.Tensor], device: torch.device, mixed_precision: str) -> torch.Tensor:
    with _autocast(device, mixed_precision):
        prediction = candidate.forward(candidate.model, batch)
    loss = flow_matching_loss(prediction, batch["target"])
    loss.backward()
    return loss


def training_step(candidate: Candidate, batch, device, mixed_precision: str, max_grad_norm: float) -> float:
    """One full optimisation step; returns its wall-clock seconds."""
    _synchronize(device)
    started = time.perf_counter()
    forward_backward(candidate, batch, device, mixed_precision)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(candidate.model.parameters(), max_grad_norm)
    candidate.optimizer.step()
    candidate.optimizer.zero_grad(set_to_none=True)
    _synchronize(device)
    return time.perf_counter() - started


class _OpRecorder(TorchDispatchMode):
    """Records every aten op that runs, to find matmul-like ops the FLOP counter has no formula for."""

    def __init__(self):
        super().__init__()
        self.ops: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket)
        return func(*args, **(kwargs or {}))


def _cpu_flash_sdpa_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_sdpa_backward_flop(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's counter knows the CUDA SDPA kernels but not the CPU flash kernel SDPA dispatches to on
# CPU; give it torch's own SDPA formulas so attention is counted on both devices.
_EXTRA_FLOP_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_sdpa_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_sdpa_backward_flop,
}


@dataclass
class FlopCount:
    per_sample: float
    attention_fraction: float
    uncounted_ops: list[str]


def count_flops(candidate: Candidate, batch, device, mixed_precision: str) -> FlopCount:
    """Model FLOPs of one forward+backward, counted op by op, divided by the batch size."""
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    recorder = _OpRecorder()
    with counter, recorder:
        forward_backward(candidate, batch, device, mixed_precision)
    candidate.model.zero_grad(set_to_none=True)
    by_op = counter.get_flop_counts()["Global"]
    total = counter.get_total_flops()
    attention = sum(flops for op, flops in by_op.items() if "attention" in str(op))
    matmul_like = ("mm", "attention", "conv", "linear", "einsum")
    uncounted = sorted(
        str(op) for op in recorder.ops if any(word in str(op) for word in matmul_like) and op not in counter.flop_registry
    )
    return FlopCount(total / batch["noisy"].shape[0], attention / max(total, 1), uncounted)


def measure_peak_flops(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Best-of-`repeats` FLOP/s of a square `size`^3 matmul: the machine's practical ceiling for `dtype`."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)  # warm-up: thread pool, kernel selection, CUDA context
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        started = time.perf_counter()
        torch.mm(a, b)
        _synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def machine_description(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        hardware = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        hardware = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    hardware = line.split(":", 1)[1].strip()
                    break
    return f"machine: {hardware}, device {device}, {threads} thread(s), torch {torch.__version__}, {platform.python_implementation()} {platform.python_version()}"


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    config = load_train_config(args.config)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("`--device cuda` was requested but torch.cuda.is_available() is False.")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    mixed_precision = args.mixed_precision or config.mixed_precision
    if mixed_precision not in ("no", "bf16"):
        raise ValueError(f"config {args.config} uses mixed_precision={mixed_precision!r}; pass `--mixed-precision no` or `bf16`.")
    batch_size = args.batch_size or config.train_batch_size
    peak_dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    peak_size = args.peak_size or (8192 if device.type == "cuda" else 2048)

    candidates = build_candidates(config)
    batch = make_batch(config, candidates[0].model.config, batch_size, device)
    for candidate in candidates:
        candidate.model.to(device).train()
        candidate.optimizer = torch.optim.AdamW(
            candidate.model.parameters(), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay,
        )

    peak = measure_peak_flops(device, peak_dtype, peak_size, args.peak_repeats)
    flops = {c.name: count_flops(c, batch, device, mixed_precision) for c in candidates}
    for _ in range(args.warmup_steps):
        for candidate in candidates:
            training_step(candidate, batch, device, mixed_precision, config.max_grad_norm)
    for _ in range(args.steps):  # alternate models so background load affects both alike
        for candidate in candidates:
            candidate.step_seconds.append(training_step(candidate, batch, device, mixed_precision, config.max_grad_norm))

    shape = tuple(batch["noisy"].shape)
    lines = [
        f"Training throughput: {args.config.name} (batch {batch_size}, input {shape}, text {tuple(batch['text'].shape)}), "
        f"mixed precision {mixed_precision}, {args.warmup_steps} warm-up + {args.steps} timed steps per model (median)",
        "",
        "| model | params (M) | FLOPs/sample (G) | samples/s | achieved GFLOP/s | peak GFLOP/s | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for candidate in candidates:
        count = flops[candidate.name]
        step = statistics.median(candidate.step_seconds)
        samples_per_second = batch_size / step
        achieved = count.per_sample * samples_per_second
        lines.append(
            f"| {candidate.name} | {candidate.num_parameters / 1e6:.3f} | {count.per_sample / 1e9:.3g} | {samples_per_second:.2f} "
            f"| {achieved / 1e9:.3g} | {peak / 1e9:.1f} | {achieved / peak:.1%} |"
        )
        notes.append(
            f"- {candidate.name}: {candidate.num_parameters:,} parameters, {candidate.tokens_per_sample} tokens/sample, "
            f"step median {step:.3f} s (min {min(candidate.step_seconds):.3f}, max {max(candidate.step_seconds):.3f}), "
            f"SDPA attention {count.attention_fraction:.1%} of counted FLOPs"
            + (f"; NOT counted (no formula): {', '.join(count.uncounted_ops)}" if count.uncounted_ops else "")
        )
    lines += [
        "",
        *notes,
        "- FLOPs: torch.utils.flop_counter.FlopCounterMode on one forward+backward (matmul, conv and SDPA attention, "
        "incl. the CPU flash-attention kernel); elementwise, norm and optimizer work is not counted.",
        f"- peak: best of {args.peak_repeats} {peak_size}^3 {str(peak_dtype).removeprefix('torch.')} matmuls on this machine.",
        "- step: autocast forward, MSE to the velocity target, backward, "
        + (f"grad-norm clip {config.max_grad_norm}, " if config.max_grad_norm else "")
        + "AdamW; text encoder, EMA and data loading excluded (same for both models).",
        "- " + machine_description(device, threads),
    ]
    report = "\n".join(lines)
    print(report)
    return report


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:
        print(f"train_throughput.py: error: {error}", file=sys.stderr)
        sys.exit(2)
