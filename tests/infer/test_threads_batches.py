"""Batch size and threads: the card's, else automatic; one call sets the threads of a process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dicom_ai_node.infer import LoadedModel, configure_threads
from dicom_ai_node.infer.backends import OnnxBackend
from dicom_ai_node.infer.card import InputSpec, ModelCard
from dicom_ai_node.infer.runtime import (
    auto_batch_size,
    configure_tensorflow,
    resolve_threads,
    thread_settings,
    usable_cores,
)
from tests.support.models import convert_package


@pytest.mark.parametrize(
    ("size", "channels", "expected"),
    [(32, 1, 16), (128, 1, 16), (224, 1, 8), (224, 3, 8), (256, 1, 8), (512, 1, 2), (1024, 1, 1)],
)
def test_automatic_batch_size_shrinks_with_the_input(size: int, channels: int, expected: int):
    assert auto_batch_size(InputSpec(height=size, width=size, channels=channels)) == expected  # type: ignore[arg-type]


def test_batch_size_is_the_cards_else_the_callers_else_automatic(
    tiny_package: Path, tiny_card: ModelCard
):
    assert LoadedModel(tiny_package).batch_size == auto_batch_size(tiny_card.input) == 16
    assert LoadedModel(tiny_package, batch_size=3).batch_size == 3
    card = tiny_card.model_copy(update={"batch_size": 5})
    model = LoadedModel(tiny_package, card=card, batch_size=3)
    assert model.batch_size == 5 and model.backend.shape[0] == 5


def test_short_batch_runs_unpadded_on_keras(tiny_package: Path, ct_series: list[Path]):
    """The key image's map and a series' last batch cost their own images, not a batch."""
    model = LoadedModel(tiny_package, batch_size=4, heatmaps="key")
    assert model.backend.fixed_batch is False
    result = model.predict_series(ct_series)
    assert result.key_image.heatmap is not None
    assert sum(image.heatmap is not None for image in result.images) == 1


def test_automatic_threads_are_the_usable_cores():
    assert resolve_threads() == resolve_threads(0, 0)
    assert resolve_threads().intra_op == usable_cores() >= 1
    assert resolve_threads().inter_op == 1
    assert resolve_threads(3, 2).intra_op == 3 and resolve_threads(3, 2).inter_op == 2
    with pytest.raises(ValueError, match="must be >= 0"):
        resolve_threads(-1)


def test_configure_threads_after_tensorflow_runs_refuses_other_counts():
    configure_tensorflow()
    running = thread_settings()
    assert configure_threads(running.intra_op, running.inter_op) == running  # same: harmless
    with pytest.raises(RuntimeError, match="before the first model is loaded"):
        configure_threads(running.intra_op + 1, running.inter_op)
    assert thread_settings() == running


@pytest.mark.slow
def test_card_threads_cap_onnx_runtime_at_the_process_setting(tmp_path: Path, tiny_package: Path):
    onnx_package = convert_package(tiny_package, tmp_path, "onnx")
    card = ModelCard.load(onnx_package / "model.toml")
    process = thread_settings().intra_op
    for asked, expected in ((0, process), (1, 1), (process + 8, process)):
        model = LoadedModel(onnx_package, card=card.model_copy(update={"threads": asked}))
        assert isinstance(model.backend, OnnxBackend)
        options = model.backend.session.get_session_options()
        assert model.threads.intra_op == options.intra_op_num_threads == expected


@pytest.mark.slow
def test_configure_threads_sets_tensorflows_pools_in_a_fresh_process(tiny_package: Path):
    """What a work process does first: its threads, then its models."""
    code = f"""
import tensorflow as tf
from pathlib import Path
from dicom_ai_node.infer import LoadedModel, configure_threads
configure_threads(1, 1)
model = LoadedModel(Path({str(tiny_package)!r}))
print(model.threads.intra_op, model.threads.inter_op,
      tf.config.threading.get_intra_op_parallelism_threads(),
      tf.config.threading.get_inter_op_parallelism_threads())
"""
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert out.split() == ["1", "1", "1", "1"]
