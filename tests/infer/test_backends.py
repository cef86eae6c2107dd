"""SavedModel and ONNX packages: same answers as the Keras weights they came from, heat maps
by each backend's method, and broken packages refused with a message naming the package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicom_ai_node.infer import LoadedModel, ModelPackageError
from dicom_ai_node.infer.card import InputSpec, ModelCard
from tests.support.models import Kind, convert_package, write_package

pytestmark = pytest.mark.slow

KINDS: list[Kind] = ["saved_model", "onnx"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, tiny_package: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("converted")
    return {kind: convert_package(tiny_package, root, kind) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_converted_package_gives_the_keras_probabilities(
    converted: dict[str, Path], tiny_package: Path, ct_series: list[Path], kind: Kind
):
    reference = LoadedModel(tiny_package, batch_size=2).predict_series(ct_series)
    model = LoadedModel(converted[kind], batch_size=2, heatmaps="all")
    assert model.backend.kind == kind
    result = model.predict_series(ct_series)
    np.testing.assert_allclose(
        [i.probabilities["hemorrhage"] for i in result.images],
        [i.probabilities["hemorrhage"] for i in reference.images],
        atol=1e-5,
    )
    assert result.label == reference.label
    assert len(result.weights_sha256) == 64 and result.weights_sha256 != reference.weights_sha256
    key = result.key_image.heatmap
    assert key is not None and key.shape == (32, 32)
    assert key.min() >= 0.0 and key.max() <= 1.0
    maps = sum(i.heatmap is not None for i in result.images)
    if kind == "onnx":  # occlusion costs 64 passes an image: the key image only
        assert result.explanation == "occlusion" and maps == 1
    else:
        assert result.explanation == "input gradient saliency" and maps == len(result.images)


def test_explanation_none_makes_no_map_and_says_so(
    converted: dict[str, Path], ct_series: list[Path]
):
    card = ModelCard.load(converted["onnx"] / "model.toml")
    model = LoadedModel(converted["onnx"], card=card.model_copy(update={"explanation": "none"}))
    result = model.predict_series(ct_series)
    assert result.explanation == "none"
    assert all(image.heatmap is None for image in result.images)


def test_gradcam_is_refused_for_onnx_weights(converted: dict[str, Path]):
    card = ModelCard.load(converted["onnx"] / "model.toml")
    with pytest.raises(ModelPackageError, match=r"tiny-ct-onnx.*'gradcam' is not available"):
        LoadedModel(converted["onnx"], card=card.model_copy(update={"explanation": "gradcam"}))


@pytest.mark.parametrize("kind", ["keras", *KINDS])
def test_broken_weights_are_refused_naming_the_package(
    tmp_path: Path, tiny_card: ModelCard, kind: Kind
):
    card = tiny_card.model_copy(update={"name": f"broken-{kind}"})
    package = tmp_path / card.name
    package.mkdir()
    card.dump(package / "model.toml")
    if kind == "saved_model":
        (package / "saved_model").mkdir()
        (package / "saved_model" / "saved_model.pb").write_bytes(b"not a protobuf")
    else:
        (package / f"model.{'keras' if kind == 'keras' else 'onnx'}").write_bytes(b"garbage")
    with pytest.raises(ModelPackageError, match=rf"^model package broken-{kind} \(.*cannot load"):
        LoadedModel(package)


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_input_shape_is_refused(tmp_path: Path, tiny_card: ModelCard, kind: Kind):
    card = tiny_card.model_copy(update={"name": f"shape-{kind}"})
    write_package(tmp_path, card, InputSpec(height=48, width=48), len(card.labels), kind)
    with pytest.raises(ModelPackageError, match=rf"shape-{kind}.*\(32, 32, 1\).*\(48, 48, 1\)"):
        LoadedModel(tmp_path / card.name)


def test_two_sets_of_weights_are_refused(
    tmp_path: Path, converted: dict[str, Path], tiny_package: Path
):
    import shutil

    package = shutil.copytree(converted["onnx"], tmp_path / "both")
    shutil.copy(tiny_package / "model.keras", package)
    with pytest.raises(ModelPackageError, match=r"more than one set of weights"):
        LoadedModel(package)


def test_nchw_onnx_network_as_pytorch_exports_it(
    tmp_path: Path, tiny_card: ModelCard, ct_series: list[Path]
):
    """An NCHW graph (mean of the image -> 2 logits -> softmax) runs with layout = "NCHW"."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "nchw",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, 32, 32])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", 2])],
        [
            helper.make_tensor("w", TensorProto.FLOAT, [1, 2], [-4.0, 4.0]),
            helper.make_tensor("b", TensorProto.FLOAT, [2], [1.0, -1.0]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    card = tiny_card.model_copy(
        update={"name": "nchw", "input": InputSpec(height=32, width=32, layout="NCHW")}
    )
    package = tmp_path / "nchw"
    package.mkdir()
    onnx.save(model, package / "model.onnx")
    card.dump(package / "model.toml")
    loaded = LoadedModel(package, batch_size=2)
    assert loaded.backend.parameters == 4
    result = loaded.predict_series(ct_series)
    for image in result.images:  # p(hemorrhage) = softmax(8 * mean - 2)
        assert 0.0 < image.probabilities["hemorrhage"] < 1.0
    assert result.key_image.heatmap is not None and result.explanation == "occlusion"
    with pytest.raises(ModelPackageError, match=r"nhwc.*\(32, 32, 1\) but the weights take"):
        card = card.model_copy(update={"name": "nhwc", "input": InputSpec(height=32, width=32)})
        LoadedModel(package, card=card)
