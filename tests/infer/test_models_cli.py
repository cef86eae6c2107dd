"""``models import``, ``models check`` and ``models list`` on small packages of each kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dicom_ai_node.cli import app
from dicom_ai_node.infer.backends import weights_sha256
from dicom_ai_node.infer.card import InputSpec, ModelCard
from dicom_ai_node.train.model import build_classifier
from tests.support.models import Kind, export

pytestmark = pytest.mark.slow

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same tiny network as .keras, SavedModel and .onnx, and one of the wrong size."""
    from dicom_ai_node.infer.runtime import configure_tensorflow

    configure_tensorflow()
    root = tmp_path_factory.mktemp("exported")
    model = build_classifier(InputSpec(height=32, width=32), 2, filters=2)
    kinds: list[Kind] = ["keras", "saved_model", "onnx"]
    paths: dict[str, Path] = {kind: export(model, root, kind) for kind in kinds}
    (root / "wrong").mkdir()
    paths["wrong"] = export(
        build_classifier(InputSpec(height=40, width=40), 2, filters=2), root / "wrong", "onnx"
    )
    return paths


@pytest.mark.parametrize("kind", ["keras", "saved_model", "onnx"])
def test_import_builds_and_checks_a_package_then_list_shows_its_hash(
    tmp_path: Path,
    exported: dict[str, Path],
    tiny_card: ModelCard,
    ct_series: list[Path],
    kind: str,
):
    card_file = tmp_path / "card.toml"
    tiny_card.model_copy(update={"name": f"imported-{kind}"}).dump(card_file)
    out = tmp_path / "packages"
    out.mkdir()
    result = runner.invoke(
        app, ["models", "import", str(exported[kind]), "--card", str(card_file), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "package checked" in result.output and "test inference" in result.output
    package = out / f"imported-{kind}"
    assert sorted(p.name for p in package.iterdir()) == sorted(["model.toml", exported[kind].name])
    listed = runner.invoke(app, ["models", "list", "--json", "--models-dir", str(out)])
    row = next(r for r in json.loads(listed.output) if r["name"] == f"imported-{kind}")
    assert row["weights_sha256"] == f"{exported[kind].name} {weights_sha256(exported[kind])}"
    checked = runner.invoke(app, ["models", "check", str(package), *map(str, ct_series[:2])])
    assert checked.exit_code == 0, checked.output
    assert "32x32x1" in checked.output and "MONOCHROME2" in checked.output


def test_import_of_weights_that_do_not_match_the_card_is_refused(
    tmp_path: Path, exported: dict[str, Path], tiny_card: ModelCard
):
    card_file = tmp_path / "card.toml"
    tiny_card.model_copy(update={"name": "mismatch"}).dump(card_file)
    result = runner.invoke(
        app,
        [
            "models",
            "import",
            str(exported["wrong"]),
            "--card",
            str(card_file),
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 1
    assert "model package mismatch" in result.output and "(40, 40, 1)" in result.output
    assert not (tmp_path / "mismatch").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["card.toml"]  # nothing left behind
