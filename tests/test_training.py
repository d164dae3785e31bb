"""training/train.py: smoke run, exact resume, atomic checkpoints, config overrides, 2-process DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chronos_video import NanoSoraPipeline
from chronos_video.training_utils import list_checkpoints, load_state_dict, resolve_checkpoint, save_checkpoint, save_state_dict
from conftest import load_train_script

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "training" / "configs" / "smoke.yaml"


def load_train_module():
    return load_train_script("chronos_train")


@pytest.fixture(scope="module")
def train():
    return load_train_module()


def smoke_args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return ["--config", str(SMOKE), "--output_dir", str(tmp_path / name), "--report_to", "null",
            "--data.cache_dir", str(tmp_path / "data-cache"), *extra]


def transformer_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_smoke_run_produces_a_loadable_pipeline_with_model_card(train, tmp_path):
    out = train.main(smoke_args(tmp_path, "run"))
    for name in ("model_index.json", "README.md", "samples.gif", "oracle_scores.json", "training_config.json", "training_summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 6 and summary["train_seconds"] > 0 and summary["resumed_from_step"] == 0
    card = (out / "README.md").read_text()
    assert "pipeline_tag: text-to-video" in card and "| color |" in card and "TODO" not in card
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-3", "checkpoint-6"]
    pipe = NanoSoraPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe("a small red circle moving left to right slowly", num_inference_steps=2).frames
    assert frames.shape == (1, 8, 16, 16, 3)


# The motion recipe of the shipped configs: a caption-pretrained, frozen text encoder, absolute positions,
# centred paths and clean-sample prediction.
MOTION_RECIPE = ("--text_encoder_pretrain_steps", "5", "--train_text_encoder", "false", "--model.absolute_pos_embed", "true",
                 "--model.hidden_size", "32", "--data.start_spread", "0.0", "--model.prediction_type", "sample")


@pytest.mark.parametrize("recipe", [(), MOTION_RECIPE], ids=["default", "motion-recipe"])
def test_interrupted_then_resumed_run_matches_uninterrupted(train, tmp_path, recipe):
    full = train.main(smoke_args(tmp_path, "full", *recipe))
    half = train.main(smoke_args(tmp_path, "resumed", "--max_train_steps", "3", *recipe))
    resumed = train.main(smoke_args(tmp_path, "resumed", "--max_train_steps", "6", "--resume_from_checkpoint", "latest", *recipe))
    expected, got = transformer_weights(full), transformer_weights(resumed)
    assert half == resumed and expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    frozen_saved = (resumed / "checkpoints" / "checkpoint-6" / "frozen_text_encoder.safetensors").is_file()
    assert frozen_saved == bool(recipe)
    text_expected = load_file(str(full / "text_encoder" / "model.safetensors"))
    text_got = load_file(str(resumed / "text_encoder" / "model.safetensors"))
    for key in text_expected:
        torch.testing.assert_close(text_got[key], text_expected[key], rtol=1e-5, atol=1e-6, msg=key)
    state = json.loads((resumed / "checkpoints" / "checkpoint-6" / "training_state.json").read_text())
    assert state["step"] == 6


def test_incomplete_checkpoints_are_never_resumed(tmp_path):
    states = {"trainable": {"params": [torch.ones(2)]}}
    save_checkpoint(tmp_path, 3, states, {})
    # what a process killed mid-write leaves behind: a staging folder, and a folder without its state file
    (tmp_path / ".checkpoint-6.tmp").mkdir()
    (tmp_path / "checkpoint-9").mkdir()
    save_state_dict(states["trainable"], tmp_path / "checkpoint-9", "trainable")
    assert resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-3"
    assert resolve_checkpoint(tmp_path / "nothing-here", "latest") is None
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        resolve_checkpoint(tmp_path, str(tmp_path / "checkpoint-9"))


def test_checkpoint_limit_and_exact_state_roundtrip(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"optimizer": optimizer.state_dict()}, {"note": "x"}, total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    restored = load_state_dict(tmp_path / "checkpoint-3", "optimizer")
    original = optimizer.state_dict()
    assert restored["param_groups"] == original["param_groups"]
    for key, value in original["state"].items():
        for name, tensor in value.items():
            assert torch.equal(restored["state"][key][name], tensor)
    assert not any(p.suffix in (".pkl", ".bin", ".pt") for p in (tmp_path / "checkpoint-3").iterdir())


def test_config_overrides_and_errors(train, tmp_path):
    config = train.parse_config(["--config", str(SMOKE), "--learning_rate", "0.01", "--model.hidden_size", "64", "--use_ema=false"])
    assert config.learning_rate == 0.01 and config.model["hidden_size"] == 64 and config.model["num_layers"] == 1
    assert config.use_ema is False
    with pytest.raises(ValueError, match="Unknown option `--learning_rat`"):
        train.parse_config(["--config", str(SMOKE), "--learning_rat", "0.1"])
    with pytest.raises(ValueError, match="max_train_steps"):
        train.parse_config(["--config", str(SMOKE), "--max_train_steps", "0"])
    with pytest.raises(ValueError, match="architecture"):
        train.parse_config(["--config", str(SMOKE), "--architecture", "unknown"])
    with pytest.raises(ValueError, match="pretrained_pipeline"):
        train.parse_config(["--config", str(SMOKE), "--lora_rank", "4"])
    # refused before training, not after it when the final evaluation would run
    for option, value in (("--eval_num_prompts", "0"), ("--eval_num_inference_steps", "0"), ("--validation_num_prompts", "-1")):
        with pytest.raises(ValueError, match=option.lstrip("-")):
            train.parse_config(["--config", str(SMOKE), option, value])


def test_exponent_numbers_without_a_decimal_point_are_numbers(train, tmp_path):
    """PyYAML reads `6e-4` as a string; on the command line and in a config file it must be the number."""
    config = train.parse_config(["--config", str(SMOKE), "--learning_rate", "6e-4", "--model.rope_theta", "1e4"])
    assert config.learning_rate == pytest.approx(6e-4) and config.model["rope_theta"] == 1e4
    path = tmp_path / "exponent.yaml"
    path.write_text(SMOKE.read_text() + "\nadam_weight_decay: 1e-2\n")
    assert train.parse_config(["--config", str(path)]).adam_weight_decay == pytest.approx(0.01)
    assert train.parse_config(["--config", str(SMOKE), "--hub_model_id", "me/e5"]).hub_model_id == "me/e5"


def test_config_and_builders_live_in_the_package(train):
    """`training/train.py` is the entry point only: its config and model builders come from the package."""
    from chronos_video.training_builders import backbone_kwargs, build_backbone
    from chronos_video.training_config import TrainConfig, parse_config

    assert train.TrainConfig is TrainConfig
    config = parse_config(["--config", str(SMOKE), "--model.num_layers", "2"])
    assert config == train.parse_config(["--config", str(SMOKE), "--model.num_layers", "2"])
    kwargs = backbone_kwargs(config)
    assert (kwargs["sample_frames"], kwargs["sample_height"], kwargs["text_embed_dim"], kwargs["num_layers"]) == (8, 16, 32, 2)
    assert backbone_kwargs(config, text_embed_dim=48)["text_embed_dim"] == 48
    model = build_backbone(config)
    assert type(model).__name__ == "NanoSoraTransformer3DModel" and model.config.num_layers == 2


def test_lora_finetuning_of_a_trained_pipeline(train, tmp_path):
    base = train.main(smoke_args(tmp_path, "base", "--max_train_steps", "2", "--checkpointing_steps", "10"))
    lora = train.main(smoke_args(tmp_path, "lora", "--pretrained_pipeline", str(base), "--lora_rank", "4",
                                 "--max_train_steps", "2", "--checkpointing_steps", "10", "--use_ema", "false"))
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    pipe = NanoSoraPipeline.from_pretrained(base)
    pipe.load_lora_weights(lora)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", num_inference_steps=1).frames.shape == (1, 8, 16, 16, 3)


@pytest.mark.slow
def test_two_process_cpu_training(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "training" / "train.py"),
               *smoke_args(tmp_path, "ddp", "--max_train_steps", "2", "--checkpointing_steps", "2")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "world size 2 (DistributedType.MULTI_CPU)" in log
    assert (tmp_path / "ddp" / "model_index.json").is_file()
