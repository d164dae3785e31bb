"""Training helpers: pickle-free, atomic, resumable checkpoints and resumable batch order.

`accelerator.save_state` stores optimizer, scheduler and RNG states with pickle and reloads
custom objects with `weights_only=False`. Our checkpoints hold the same content as safetensors
(every tensor) plus JSON (everything else), are written into a temporary folder and renamed
into place in one step, so a killed process can never leave a half-written checkpoint that
`--resume_from_checkpoint latest` would pick.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

# The rectified-flow objective lives in `flow_matching`; these names stay importable from here.
from .flow_matching import rectified_flow_inputs, sample_flow_sigmas  # noqa: F401

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
_TENSOR_KEY = "__tensor__"
_DICT_KEY = "__dict__"
_TUPLE_KEY = "__tuple__"


def _to_serialisable(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """Replaces every tensor in a nested structure by a reference; keeps key types exact."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}" if prefix else "t"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR_KEY: key}
    if isinstance(obj, dict):
        return {_DICT_KEY: [[k, _to_serialisable(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE_KEY: [_to_serialisable(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_to_serialisable(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"Cannot store {type(obj).__name__} in a checkpoint (at {prefix!r}).")


def _from_serialisable(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR_KEY in obj:
            return tensors[obj[_TENSOR_KEY]]
        if _DICT_KEY in obj:
            return {k: _from_serialisable(v, tensors) for k, v in obj[_DICT_KEY]}
        if _TUPLE_KEY in obj:
            return tuple(_from_serialisable(v, tensors) for v in obj[_TUPLE_KEY])
    if isinstance(obj, list):
        return [_from_serialisable(v, tensors) for v in obj]
    return obj


def save_state_dict(state: dict[str, Any], folder: Path, name: str) -> None:
    """Writes `name.safetensors` (tensors) and `name.json` (structure) into `folder`."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _to_serialisable(state, tensors, name)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(structure))


def load_state_dict(folder: Path, name: str) -> dict[str, Any]:
    tensors = load_file(str(folder / f"{name}.safetensors"))
    return _from_serialisable(json.loads((folder / f"{name}.json").read_text()), tensors)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first (temporary folders are ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found) if (p / "training_state.json").is_file()]


def resolve_checkpoint(output_dir: str | os.PathLike, resume_from_checkpoint: str | None) -> Path | None:
    """'latest' -> newest complete checkpoint (or None when there is none); a path -> that path."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not (path / "training_state.json").is_file():
        raise ValueError(f"`resume_from_checkpoint`={resume_from_checkpoint!r} is not a complete checkpoint folder.")
    return path


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    states: dict[str, dict[str, Any]],
    metadata: dict[str, Any],
    total_limit: int | None = None,
) -> Path:
    """Atomically writes `checkpoint-{step}` holding each named state dict, then prunes old ones.

    `training_state.json` is written last inside the temporary folder and the folder is renamed
    into place with `os.replace`; a checkpoint without it is never considered complete.
    """
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    staging = root / f".checkpoint-{step}.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    for name, state in states.items():
        save_state_dict(state, staging, name)
    (staging / "training_state.json").write_text(json.dumps({"step": step, **metadata}, indent=2))
    for path in staging.iterdir():  # flush file contents before the rename makes them visible
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    if total_limit is not None and total_limit > 0:
        for old in list_checkpoints(root)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, names: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    folder = Path(path)
    metadata = json.loads((folder / "training_state.json").read_text())
    return {name: load_state_dict(folder, name) for name in names}, metadata


def batch_indices(step: int, batch_size: int, num_items: int, seed: int, rank: int, world: int) -> torch.Tensor:
    """Indices of micro-batch `step` on `rank`: a pure function of (seed, step), so resume is exact."""
    global_batch = batch_size * world
    per_epoch = max(num_items // global_batch, 1)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    start = position * global_batch + rank * batch_size
    return order[start : start + batch_size]


def curriculum_batch_indices(
    micro_step: int, step: int, batch_size: int, num_main: int, num_items: int, seed: int, rank: int, world: int,
    curriculum_steps: int = 0, curriculum_mix: float = 0.0,
) -> torch.Tensor:
    """Batch indices over the main items (the first `num_main`) and the curriculum items after them.

    The curriculum fills whole batches for the first `curriculum_steps` optimiser steps and a
    `curriculum_mix` share of each batch afterwards; with neither, this is `batch_indices` on the main items.
    """
    num_extra = batch_size if step < curriculum_steps else round(curriculum_mix * batch_size)
    parts = []
    if batch_size - num_extra:
        parts.append(batch_indices(micro_step, batch_size - num_extra, num_main, seed, rank, world))
    if num_extra:
        parts.append(num_main + batch_indices(micro_step, num_extra, num_items - num_main, seed + 1, rank, world))
    return torch.cat(parts)


def training_states(trainable, optimizer, lr_scheduler, ema=None, frozen=None) -> dict[str, dict[str, Any]]:
    """Everything a checkpoint holds: trainable weights, optimiser, LR schedule, EMA and frozen
    weights that belong to the model (e.g. a pretrained text encoder), as `save_checkpoint` states."""
    states = {
        "trainable": {"params": [p.detach() for p in trainable]},
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
    }
    if ema is not None:
        states["ema"] = ema.state_dict()
    if frozen:
        states["frozen_text_encoder"] = {"params": [p.detach() for p in frozen]}
    return states


def restore_training_states(path: str | os.PathLike, trainable, optimizer, lr_scheduler, ema=None, frozen=None) -> int:
    """Loads what `training_states` saved at `path` into the live objects; returns the checkpoint's step."""
    path = Path(path)
    names = ["trainable", "optimizer", "lr_scheduler"] + (["ema"] if ema is not None else [])
    if (path / "frozen_text_encoder.json").is_file():
        names.append("frozen_text_encoder")
    states, metadata = load_checkpoint(path, names)
    for param, value in zip(trainable, states["trainable"]["params"]):
        param.data.copy_(value)
    for param, value in zip(frozen or [], states.get("frozen_text_encoder", {}).get("params", [])):
        param.data.copy_(value)
    optimizer.load_state_dict(states["optimizer"])
    lr_scheduler.load_state_dict(states["lr_scheduler"])
    if ema is not None:
        ema.load_state_dict(states["ema"])
        ema.to(trainable[0].device)  # the checkpoint loads on the CPU
    return int(metadata["step"])


def optimizer_step(accelerator, loss: torch.Tensor, trainable, optimizer, lr_scheduler, max_grad_norm: float | None) -> None:
    """Backward, gradient clipping on the synchronising micro-step, optimiser and schedule step (inside
    `accelerator.accumulate`, which turns the steps of non-final micro-batches into no-ops)."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm:
        accelerator.clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def record_update(accelerator, progress, loss: torch.Tensor, lr_scheduler, step: int, logging_steps: int, report_to, extra: dict | None = None) -> float:
    """After an optimiser update: the loss averaged over processes, shown on the progress bar and
    logged to the trackers every `logging_steps`; returns it."""
    progress.update(1)
    loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
    learning_rate = lr_scheduler.get_last_lr()[0]
    progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{learning_rate:.2e}")
    if report_to and step % logging_steps == 0:
        accelerator.log({"loss": loss_value, "lr": learning_rate, **(extra or {})}, step=step)
    return loss_value


def start_trackers(accelerator, config) -> None:
    """Opens the run's trackers (main process, `config.report_to`) with the flattened config as hyper-parameters."""
    import json
    from dataclasses import asdict

    if accelerator.is_main_process and config.report_to:
        flat = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in asdict(config).items()}
        accelerator.init_trackers("chronos-video", config={k: v for k, v in flat.items() if v is not None})


def step_batch(config, micro_step: int, step: int, num_main: int, num_items: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Generator]:
    """(clip indices, random generator) of one micro-batch: pure functions of (seed, step), so resume is exact."""
    indices = curriculum_batch_indices(
        micro_step, step, config.train_batch_size, num_main, num_items, config.seed, rank, world,
        curriculum_steps=config.curriculum_steps if config.curriculum_data else 0,
        curriculum_mix=config.curriculum_mix if config.curriculum_data else 0.0,
    )
    return indices, torch.Generator().manual_seed(config.seed * 7_919 + micro_step * world + rank)


@contextlib.contextmanager
def evaluation_weights(module: torch.nn.Module, trainable, ema=None):
    """Inside: `module` in eval mode with the EMA weights (if any) in place; restored to training afterwards."""
    if ema is not None:
        ema.store(trainable)
        ema.copy_to(trainable)
    module.eval()
    try:
        yield
    finally:
        module.train()
        if ema is not None:
            ema.restore(trainable)


def log_learning_curve(accelerator, output_dir: str | os.PathLike, step: int, metrics: dict[str, float], seconds_per_step: float) -> None:
    """One learning-curve point: to the trackers, to `<output_dir>/logs/learning_curve.jsonl` and to the log."""
    accelerator.log(metrics, step=step)
    curve = Path(output_dir) / "logs" / "learning_curve.jsonl"
    curve.parent.mkdir(parents=True, exist_ok=True)
    with curve.open("a") as handle:
        handle.write(json.dumps({"step": step, **metrics, "seconds_per_step": seconds_per_step}) + "\n")
    logging.getLogger("chronos_video.train").info(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))


def encoding_cache_path(model: torch.nn.Module, frames: torch.Tensor, root: str | os.PathLike, tag: str = "") -> Path:
    """`root/<digest>.safetensors`, the digest covering `model`'s weights, the clips and `tag`, so an encoding
    (tokenizer codes, VAE latents) is computed once per (encoder, data) and never reused for other ones."""
    digest = hashlib.sha1(tag.encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    digest.update(frames.numpy().tobytes())
    return Path(root) / f"{digest.hexdigest()[:20]}.safetensors"


def save_file_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """`safetensors.save_file` through a temporary file renamed into place: a killed run never leaves a
    truncated cache entry that a later run would read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(f".{os.getpid()}.tmp")  # one per process: DDP ranks may write the same entry
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(staging))
    os.replace(staging, path)
