"""Scores a text-to-video pipeline with the pixel oracle on prompts it was never trained on."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..data import heldout_prompts
from ..data.shapes import ATTRIBUTE_NAMES, HELDOUT_COMBINATIONS, ShapeAttributes, _restricted_combinations
from .oracle import ShapesOracle, format_oracle_table


def evaluation_prompts(
    num_prompts: int, seed: int = 0, attributes: dict[str, Sequence[str]] | None = None
) -> list[tuple[str, ShapeAttributes]]:
    """Prompts to score a model on: held-out combinations, or those a restricted training set allows.

    With `attributes` (the training data's restriction, e.g. one colour, shape, size and speed so
    that only the direction varies) the prompts cycle through every allowed combination, so all
    directions are scored equally; otherwise they are `heldout_prompts(num_prompts, seed)`.
    """
    if not attributes:
        return heldout_prompts(num_prompts, seed=seed)
    combos = _restricted_combinations("all", attributes)
    order = np.random.default_rng(seed).permutation(len(combos))
    chosen = [combos[order[i % len(combos)]] for i in range(num_prompts)]
    return [(attrs.caption(), attrs) for attrs in chosen]


def evaluate_pipeline(
    pipe,
    num_prompts: int = 32,
    num_inference_steps: int | None = 20,
    guidance_scale: float = 4.0,
    seed: int = 0,
    batch_size: int = 8,
    prompts: Sequence[tuple[str, ShapeAttributes]] | None = None,
    fvd: bool = False,
    start_spread: float = 1.0,
    by_pairing: bool = False,
    **pipeline_kwargs: Any,
) -> tuple[dict[str, float], str]:
    """Generates one video per held-out prompt and returns (oracle scores, markdown table).

    Prompts come from `heldout_prompts`, i.e. attribute combinations excluded from training,
    so the score measures compositional generalisation, not memorisation. Pass `prompts`
    (caption, attributes) pairs, e.g. from `evaluation_prompts`, to score others.
    `num_inference_steps=None` is for pipelines without sampling steps (the autoregressive one).

    `fvd=True` adds FVD-local (`fvd_local_with_floor`, not comparable to I3D-FVD) beside its floor,
    the score of real clips with the same captions; both against real clips of another draw of
    held-out prompts (of the same prompts, when `prompts` is given), placed with `start_spread`
    (use the pipeline's training value).

    `by_pairing=True` adds `scores["by_pairing"]`: the oracle scores of the videos of each held-out pairing
    (`HELDOUT_COMBINATIONS`, e.g. "red triangle"; a prompt can match two) and a row per pairing in the
    table, to see which unseen combination a model fails on.
    """
    if num_prompts < 1:
        raise ValueError(f"`num_prompts` must be >= 1, got {num_prompts}.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    held_out = prompts is None
    label = "generated (held-out prompts)" if held_out else "generated"
    prompts = list(prompts) if prompts is not None else heldout_prompts(num_prompts, seed=seed)
    videos: list[np.ndarray] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed * 100_003 + start + i) for i in range(len(chunk))]
        if num_inference_steps is not None:
            pipeline_kwargs["num_inference_steps"] = num_inference_steps
        output = pipe(
            [caption for caption, _ in chunk],
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="np",
            **pipeline_kwargs,
        )
        videos.extend(list(output.frames))
    height, width = videos[0].shape[1:3]
    oracle, attributes = ShapesOracle(height=height, width=width), [attrs for _, attrs in prompts]
    scores = oracle.score(videos, attributes)
    table = format_oracle_table({label: scores})
    if by_pairing:
        scores["by_pairing"] = _scores_by_pairing(oracle, videos, attributes)
        if scores["by_pairing"]:
            table += "\n\n" + format_oracle_table({f"held-out pairing: {name}": row for name, row in scores["by_pairing"].items()})
    if fvd:
        from .fvd_local import format_fvd_table, fvd_local_with_floor

        reference = heldout_prompts(len(prompts), seed=seed + 1) if held_out else prompts
        fvd_scores = fvd_local_with_floor(
            np.stack(videos), attributes, [attrs for _, attrs in reference], seed=seed, start_spread=start_spread
        )
        scores.update(fvd_scores)
        table += "\n\n" + format_fvd_table(fvd_scores)
    return scores, table


def _scores_by_pairing(oracle: ShapesOracle, videos: list[np.ndarray], labels: list[ShapeAttributes]) -> dict[str, dict[str, float]]:
    """Oracle scores of the videos whose prompt matches each held-out pairing (pairings without videos left out)."""
    rows = {}
    for combination in HELDOUT_COMBINATIONS:
        chosen = [i for i, attrs in enumerate(labels) if all(getattr(attrs, key) == value for key, value in combination.items())]
        if chosen:
            rows[" ".join(combination.values())] = oracle.score([videos[i] for i in chosen], [labels[i] for i in chosen])
    return rows


@torch.no_grad()
def evaluate_reconstructions(
    reconstruct: Callable[[torch.Tensor], torch.Tensor], clips: torch.Tensor, captions: Sequence[str] | None, batch_size: int = 16
) -> tuple[dict[str, Any], list[str], np.ndarray]:
    """What an autoencoder keeps of a clip: (scores, table lines, reconstructions), for any autoencoder.

    `reconstruct` maps a batch in [-1, 1] (B, C, F, H, W) to its reconstruction in the same layout; `clips` are
    uint8 (N, F, H, W, 3). Scores: reconstruction PSNR (dB, pixels in [0, 1]) and, with `captions` (shapes
    clips), the oracle's accuracy on the reconstructions beside its accuracy on the originals (the ceiling),
    so the table shows what the autoencoder destroys. The video tokenizer and the video VAE share it.
    """
    from ..flow_matching import frames_to_model_input

    reconstructions = []
    for start in range(0, clips.shape[0], batch_size):
        pixels = reconstruct(frames_to_model_input(clips[start : start + batch_size])).float().clamp(-1, 1).add(1).div(2)
        reconstructions.append(pixels.permute(0, 2, 3, 4, 1).cpu().numpy())
    reconstructed = np.concatenate(reconstructions)
    originals = clips.float().numpy() / 255.0
    mse = float(np.mean((reconstructed - originals) ** 2))
    scores: dict[str, Any] = {"psnr_db": 10 * float(np.log10(1.0 / max(mse, 1e-12))), "num_clips": int(clips.shape[0])}
    lines = [f"Reconstruction PSNR {scores['psnr_db']:.2f} dB on {scores['num_clips']} clips."]
    if captions is not None:
        height, width = clips.shape[2:4]
        oracle = ShapesOracle(height=height, width=width)
        rows = {"original clips": oracle.score(originals, list(captions)), "reconstructed": oracle.score(reconstructed, list(captions))}
        scores.update(oracle_original=rows["original clips"], oracle_reconstructed=rows["reconstructed"])
        lines += ["", format_oracle_table(rows)]
    return scores, lines, reconstructed


def evaluate_video_tokenizer(
    video_tokenizer, clips: torch.Tensor, captions: Sequence[str], batch_size: int = 16
) -> tuple[dict[str, float], str, np.ndarray]:
    """How much of a clip a video tokenizer keeps: (scores, markdown table, reconstructions).

    `clips` are uint8 (N, F, H, W, 3). Scores: those of `evaluate_reconstructions` (PSNR, oracle on the
    reconstructions and on the originals) plus the share of the codebook used by these clips.
    """
    used = torch.zeros(video_tokenizer.codebook_size, dtype=torch.bool)

    def reconstruct(video: torch.Tensor) -> torch.Tensor:
        codes = video_tokenizer.encode(video.to(video_tokenizer.device))
        used[codes.flatten().cpu()] = True
        return video_tokenizer.decode(codes)

    scores, lines, reconstructed = evaluate_reconstructions(reconstruct, clips, captions, batch_size)
    scores.update(codebook_usage=float(used.float().mean()), codes_used=int(used.sum()), codebook_size=int(video_tokenizer.codebook_size))
    table = (
        f"Reconstruction PSNR {scores['psnr_db']:.2f} dB; codebook usage {scores['codebook_usage']:.1%} "
        f"({scores['codes_used']} of {scores['codebook_size']} codes) on {scores['num_clips']} clips.\n" + "\n".join(lines[1:])
    )
    return scores, table, reconstructed


def learning_curve_metrics(
    pipe,
    data: dict[str, Any],
    num_prompts: int = 32,
    num_clips: int = 32,
    num_inference_steps: int = 20,
    guidance_scale: float = 4.0,
    seed: int = 0,
) -> dict[str, float]:
    """One learning-curve point on the clips a run trains on (`data`: its `build_shapes_dataset` settings).

    `oracle/<attribute>`: accuracy of `num_prompts` sampled videos (`evaluation_prompts`);
    `swap_gap/<attribute>`: relative caption swap gaps on `num_clips` clips placed as in training, for
    every attribute the data lets vary; `swap_gap/loss_true`. Either part is skipped when its count is 0.
    """
    from .denoising import caption_swap_loss_gaps

    metrics: dict[str, float] = {}
    restricted = data.get("attributes") or {}
    if num_prompts:
        prompts = evaluation_prompts(num_prompts, seed=seed, attributes=restricted)
        scores, _ = evaluate_pipeline(
            pipe, num_prompts=len(prompts), num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            seed=seed, prompts=prompts,
        )
        metrics.update({f"oracle/{k}": float(v) for k, v in scores.items() if isinstance(v, (int, float)) and k != "n"})
    if num_clips:
        fixed = {a for a, values in restricted.items() if isinstance(values, str) or len(values) == 1}
        varying = [a for a in ATTRIBUTE_NAMES if a not in fixed]  # swapping a fixed attribute asks for clips never trained on
        gaps = caption_swap_loss_gaps(
            pipe, varying, num_clips=num_clips, split=data.get("split", "train"), seed=seed,
            start_spread=data.get("start_spread", 1.0), data_attributes=restricted or None,
        )
        metrics["swap_gap/loss_true"] = next(iter(gaps.values()))["loss_true"]
        metrics.update({f"swap_gap/{a}": result["relative_gap"] for a, result in gaps.items()})
    return metrics
