"""`chronos-video` command line: generate, dataset, evaluate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import imageio.v3 as iio
import pytest
from datasets import load_from_disk

from chronos_video.cli import main
from conftest import make_tiny_pipeline


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("pipe")
    make_tiny_pipeline(tiny_tokenizer).save_pretrained(path)
    return path


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_generate_writes_a_playable_file(saved_pipeline, tmp_path, suffix, capsys):
    output = tmp_path / f"clip{suffix}"
    code = main(["generate", "--pipeline", str(saved_pipeline), "--prompt", "a small red circle moving left to right slowly",
                 "--steps", "2", "--output", str(output), "--upscale", "2", "--score"])
    assert code == 0 and output.is_file()
    frames = iio.imread(output, index=None)
    assert frames.shape[0] == 4 and frames.shape[1:3] == (32, 32)
    printed = capsys.readouterr().out
    assert "wrote" in printed and "| color |" in printed


def test_generate_rejects_bad_output_suffix(saved_pipeline, tmp_path, capsys):
    code = main(["generate", "--pipeline", str(saved_pipeline), "--prompt", "x", "--output", str(tmp_path / "x.avi")])
    assert code == 2 and "--output" in capsys.readouterr().err


def test_generate_reports_bad_pipeline_arguments(saved_pipeline, tmp_path, capsys):
    code = main(["generate", "--pipeline", str(saved_pipeline), "--prompt", "x", "--height", "18", "--output", str(tmp_path / "x.gif")])
    assert code == 2 and "`height`" in capsys.readouterr().err


def test_dataset_command(tmp_path):
    assert main(["dataset", "--output", str(tmp_path / "ds"), "--num-clips", "6", "--num-frames", "8", "--height", "16", "--width", "16"]) == 0
    dataset = load_from_disk(str(tmp_path / "ds"))
    assert len(dataset) == 6 and {"frames", "caption", "color", "direction"} <= set(dataset.column_names)


def test_evaluate_prints_the_oracle_table(saved_pipeline, tmp_path, capsys):
    scores_path = tmp_path / "scores.json"
    assert main(["evaluate", "--pipeline", str(saved_pipeline), "--num-prompts", "3", "--steps", "1", "--json", str(scores_path)]) == 0
    assert "| color |" in capsys.readouterr().out
    scores = json.loads(scores_path.read_text())
    assert scores["n"] == 3 and 0.0 <= scores["all"] <= 1.0
    assert main(["evaluate", "--pipeline", str(saved_pipeline), "--num-prompts", "6", "--steps", "1", "--by-pairing", "--json", str(scores_path)]) == 0
    assert "| held-out pairing: " in capsys.readouterr().out
    by_pairing = json.loads(scores_path.read_text())["by_pairing"]
    # every held-out prompt matches at least one pairing, and each row scores only its own prompts
    assert by_pairing and sum(row["n"] for row in by_pairing.values()) >= 6 and all(row["n"] <= 6 for row in by_pairing.values())


def test_calibrate_stores_a_schedule_usable_as_precision_calibrated(saved_pipeline, tmp_path):
    from chronos_video import NanoSoraPipeline

    target = tmp_path / "calibrated"
    shutil.copytree(saved_pipeline, target)
    weights = {path: path.read_bytes() for path in target.rglob("*.safetensors")}
    assert main(["calibrate", "--pipeline", str(target), "--num-prompts", "2", "--steps", "5"]) == 0
    assert {path: path.read_bytes() for path in target.rglob("*.safetensors")} == weights  # only model_index.json changes
    model_index = json.loads((target / "model_index.json").read_text())
    assert "_name_or_path" not in model_index and model_index["calibrated_precision_schedule"]["rules"]
    assert not list(target.glob("*.tmp"))
    pipe = NanoSoraPipeline.from_pretrained(target)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.calibrated_precision_schedule["rules"]
    out = pipe("a small red circle moving left to right slowly", num_inference_steps=2, precision="calibrated")
    assert all("gauge" in step for step in out.trace)
    copy = tmp_path / "copy"
    assert main(["calibrate", "--pipeline", str(saved_pipeline), "--output", str(copy), "--num-prompts", "1", "--steps", "5"]) == 0
    assert NanoSoraPipeline.from_pretrained(copy).config.calibrated_precision_schedule["rules"]
    assert NanoSoraPipeline.from_pretrained(saved_pipeline).config.calibrated_precision_schedule is None


def test_swap_gap_prints_a_table_and_writes_json(saved_pipeline, tmp_path, capsys):
    path = tmp_path / "gaps.json"
    argv = ["swap-gap", "--pipeline", str(saved_pipeline), "--attributes", "color,direction", "--num-clips", "2", "--json", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| attribute swapped |" in out and "| color |" in out and "| direction |" in out
    results = json.loads(path.read_text())
    assert set(results) == {"color", "direction"} and results["color"]["n"] == 2
    assert main(["swap-gap", "--pipeline", str(saved_pipeline), "--attributes", "texture"]) == 2
    assert "`attribute` must be one of" in capsys.readouterr().err


def test_swap_gap_scores_clips_placed_as_the_pipeline_was_trained(saved_pipeline, tmp_path, capsys):
    """A pipeline trained on centred paths is scored on centred clips unless told otherwise."""
    target = tmp_path / "centred"
    shutil.copytree(saved_pipeline, target)
    argv = ["swap-gap", "--pipeline", str(target), "--attributes", "direction", "--num-clips", "2", "--json"]
    assert main([*argv, str(tmp_path / "anywhere.json")]) == 0
    (target / "training_config.json").write_text(json.dumps({"data": {"start_spread": 0.0}}))
    assert main([*argv, str(tmp_path / "centred.json")]) == 0
    assert main([*argv, str(tmp_path / "flag.json"), "--start-spread", "1.0"]) == 0
    capsys.readouterr()
    loss = {name: json.loads((tmp_path / f"{name}.json").read_text())["direction"]["loss_true"] for name in ("anywhere", "centred", "flag")}
    assert loss["anywhere"] == loss["flag"] != loss["centred"]


def test_a_missing_local_pipeline_fails_at_once_naming_the_path(tmp_path, monkeypatch, capsys):
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    for command in ("generate", "evaluate", "swap-gap", "calibrate"):
        extra = ["--prompt", "x"] if command == "generate" else []
        for path in ("pipelines/nope", "./nope", str(tmp_path / "gone"), "a/b/c"):
            assert main([command, "--pipeline", path, *extra]) == 2
            error = capsys.readouterr().err
            assert f"`--pipeline` {path!r}" in error and "does not exist" in error, error
    assert main(["generate", "--pipeline", "empty", "--prompt", "x"]) == 2
    assert "has no model_index.json" in capsys.readouterr().err


def test_a_hub_id_is_not_mistaken_for_a_local_path(tmp_path, monkeypatch):
    from chronos_video.cli import check_pipeline_path

    monkeypatch.chdir(tmp_path)
    assert check_pipeline_path("some-owner/some-model") is None


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def test_import_and_help_load_no_heavy_library():
    """`import chronos_video` and the CLI's `--help` stay fast: torch, diffusers and transformers load on first use."""
    result = _run_python(
        "import sys, chronos_video; from chronos_video.cli import build_parser; build_parser().format_help();"
        "print([m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])"
    )
    assert result.returncode == 0 and result.stdout.strip() == "[]" and result.stderr == "", result.stderr


def test_first_use_of_the_package_is_quiet():
    """Loading the pipelines does not print the quantisation backends' import-time warnings."""
    result = _run_python("import chronos_video; chronos_video.NanoSoraPipeline; print(sorted(chronos_video.__all__)[:2])")
    assert result.returncode == 0, result.stderr
    for noise in ("Failed to load", "register_constant", "gemm_4bit_forward", "Unable to import `torchao`"):
        assert noise not in result.stderr, result.stderr
