"""SavedModel and ONNX packages run through the whole node like the Keras one: storescu in,
the same labels out, SR and SC in the outbox with the weights' hash in them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicom_ai_node.infer import BUNDLED_MODELS_DIR, LoadedModel
from dicom_ai_node.jobs.models import Result
from dicom_ai_node.node import Node
from dicom_ai_node.synth import Label, Task, generate_studies
from tests.support.models import Kind, convert_package
from tests.support.nodes import done_jobs, store_study

pytestmark = [pytest.mark.peers, pytest.mark.slow]


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[Label, Path]:
    out = tmp_path_factory.mktemp("studies")
    return {
        label: generate_studies(Task.CXR_OPACITY, label, 1, out / label.value, seed=4242)[0]
        for label in (Label.POSITIVE, Label.NEGATIVE)
    }


@pytest.mark.parametrize("kind", ["saved_model", "onnx"])
def test_converted_chest_model_labels_studies_through_the_scp(
    node_factory: Callable[..., Node],
    shipped_routes: list[dict[str, Any]],
    studies: dict[Label, Path],
    tmp_path: Path,
    kind: Kind,
) -> None:
    package = convert_package(BUNDLED_MODELS_DIR / "cxr-opacity-demo", tmp_path, kind)
    model = LoadedModel(package)
    routes = [{**shipped_routes[0], "model": model.card.name}]
    node = node_factory(models={model.card.name: model}, routes=routes)
    for study in studies.values():
        store_study(node, study)
    by_study = {job.study_instance_uid: job for job in done_jobs(node, 2)}
    positive = by_study[studies[Label.POSITIVE].name]
    negative = by_study[studies[Label.NEGATIVE].name]
    assert (positive.label, positive.positive) == ("opacity", True)
    assert (negative.label, negative.positive) == ("normal", False)
    with node.read_sessions() as session:
        results = session.scalars(select(Result).where(Result.job_id == positive.id)).all()
    assert {r.kind for r in results} == {"sr", "sc"}
    sr = dcmread(node.spool.locate(next(r.path for r in results if r.kind == "sr")))
    texts = {str(e.value) for e in sr.iterall() if e.keyword == "TextValue"}
    assert f"weights sha256 {model.weights_sha256}" in texts
