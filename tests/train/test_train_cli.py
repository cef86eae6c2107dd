"""End to end through the CLI: synth -> train -> package -> evaluate, and the models commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from dicom_ai_node.infer import LoadedModel
from dicom_ai_node.infer.card import ModelCard
from dicom_ai_node.synth import Task
from dicom_ai_node.train.data import load_folder
from dicom_ai_node.train.tasks import TASK_CARDS

pytestmark = pytest.mark.slow

runner = CliRunner()


def _recompute(report: dict[str, Any]) -> dict[str, float]:
    """The metrics from the saved predictions, written out independently of the module."""
    truth = np.array([p["truth"] for p in report["predictions"]])
    score = np.array([p["score"] for p in report["predictions"]])
    predicted = score >= report["threshold"]
    tp, tn = np.sum(predicted & (truth == 1)), np.sum(~predicted & (truth == 0))
    fp, fn = np.sum(predicted & (truth == 0)), np.sum(~predicted & (truth == 1))
    pos, neg = score[truth == 1], score[truth == 0]
    auc = (np.sum(pos[:, None] > neg) + 0.5 * np.sum(pos[:, None] == neg)) / (len(pos) * len(neg))
    return {
        "accuracy": (tp + tn) / len(truth),
        "sensitivity": tp / (tp + fn),
        "specificity": tn / (tn + fp),
        "roc_auc": auc,
        "tp": tp, "tn": tn, "fp": fp, "fn": fn,
    }  # fmt: skip


def test_train_from_npz_and_evaluate_dicom_series(cli: typer.Typer, tmp_path: Path):
    npz = tmp_path / "ct.npz"
    result = runner.invoke(
        cli, ["synth", "--task", "head-ct-hemorrhage", "--label", "both", "--count", "80",
              "--format", "npz", "--out", str(npz), "--seed", "4"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        cli, ["train", str(npz), "--task", "head-ct-hemorrhage", "--out", str(tmp_path / "m"),
              "--name", "tiny-ct", "--epochs", "3", "--filters", "4", "--seed", "1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    package = tmp_path / "m" / "tiny-ct"
    model = LoadedModel(package)  # the card matches the weights
    assert model.card.name == "tiny-ct" and model.card.explain_layer == "explain_conv"
    assert (package / "model.keras").stat().st_size < 5_000_000
    report = json.loads((package / "evaluation.json").read_text())
    assert report["cases"] == len(report["predictions"]) == 12
    again = _recompute(report)
    for key in ("accuracy", "sensitivity", "specificity", "roc_auc"):
        assert report["metrics"][key] == pytest.approx(again[key])
    assert report["confusion_matrix"] == {k: int(again[k]) for k in ("tp", "fp", "tn", "fn")}
    lo, hi = report["confidence_intervals_95"]["accuracy"]
    assert lo <= report["metrics"]["accuracy"] <= hi
    assert Image.open(package / "evaluation-roc.png").size == (400, 400)
    assert "| roc_auc |" in (package / "evaluation.md").read_text()

    # Series-level evaluation of DICOM studies through the runtime.
    data = tmp_path / "series"
    result = runner.invoke(
        cli, ["synth", "--task", "head-ct-hemorrhage", "--label", "both", "--count", "2",
              "--out", str(data), "--size", "128", "--slices", "6", "--seed", "8"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = tmp_path / "eval"
    result = runner.invoke(cli, ["evaluate", str(data), "--model", str(package), "--out", str(out)])
    assert result.exit_code == 0, result.output
    series_report = json.loads((out / "evaluation.json").read_text())
    assert series_report["level"] == "series" and series_report["cases"] == 4


def test_train_from_dicom_folder(cli: typer.Typer, tmp_path: Path):
    data = tmp_path / "cxr"
    result = runner.invoke(
        cli, ["synth", "--task", "cxr-opacity", "--label", "both", "--count", "8", "--out",
              str(data), "--size", "128", "--seed", "3"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(list((data / "positive").rglob("*.dcm"))) == 8
    result = runner.invoke(
        cli, ["train", str(data), "--task", "cxr-opacity", "--out", str(tmp_path / "m"),
              "--epochs", "1", "--filters", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert ModelCard.load(tmp_path / "m" / "cxr-opacity-demo" / "model.toml").modalities == [
        "CR",
        "DX",
    ]


def test_picture_folders_load_like_dicom(tmp_path: Path):
    card = TASK_CARDS[Task.CXR_OPACITY]
    for label, value in (("opacity", 200), ("normal", 50)):
        (tmp_path / label).mkdir()
        Image.fromarray(np.full((64, 32), value, np.uint8)).save(tmp_path / label / "a.png")
    samples = load_folder(tmp_path, card)
    assert samples.images.shape == (2, 128, 128, 1)
    index = samples.labels.tolist().index(1)
    assert samples.images[index, 64, 64, 0] == pytest.approx(200 / 255, abs=1e-3)
    assert samples.images[index, 64, 0, 0] == 0.0  # padded: 64x32 keeps its aspect


def test_models_list_json_and_show(cli: typer.Typer):
    result = runner.invoke(cli, ["models", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert rows["head-ct-hemorrhage-demo"]["labels"] == ["normal", "hemorrhage"]
    assert rows["cxr-opacity-demo"]["modalities"] == ["CR", "DX"]
    assert rows["cxr-opacity-demo"]["version"] == "0.1.0"
    result = runner.invoke(cli, ["models", "show", "cxr-opacity-demo"])
    assert result.exit_code == 0 and "RID28530" in result.output


def test_bad_input_gives_a_message_not_a_traceback(cli: typer.Typer, tmp_path: Path):
    result = runner.invoke(cli, ["models", "show", "no-such-model"])
    assert result.exit_code == 1 and "no model named 'no-such-model'" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    (tmp_path / "cats").mkdir()
    result = runner.invoke(cli, ["train", str(tmp_path), "--task", "cxr-opacity"])
    assert result.exit_code == 1 and "not labels of model" in result.output
    result = runner.invoke(cli, ["synth", "--task", "knee-mri", "--label", "positive",
                                 "--count", "1", "--out", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 2
