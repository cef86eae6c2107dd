"""Images/second of the node's inference runtime against raw compute and a naive loop.

Usage: ``.venv/bin/python benchmarks/inference.py [--images 200] [--batch-size 16]``

On one synthetic head CT series (``--images`` slices of 256x256, a mix-free single transfer
syntax per series as the generator writes it) with the bundled head-ct-hemorrhage-demo model:

- end to end: ``LoadedModel.predict_series`` from the files (read, decode, rescale, window,
  resize, infer, aggregate, Grad-CAM per the heat-map policy);
- decode only: the same preprocessing without the network;
- compute only: the runtime's compiled ``tf.function`` on one pre-built batch, repeated;
- naive: ``model.predict`` called per image, on pre-built inputs.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom import dcmread

from dicom_ai_node.infer import LoadedModel, load_models
from dicom_ai_node.infer.backends import KerasBackend
from dicom_ai_node.infer.preprocess import to_model_input
from dicom_ai_node.synth import Label, Task, generate_studies

COMPUTE = "compute only, tf.function on a pre-built batch"


def best_of(repeats: int, run: Callable[[], object]) -> float:
    """Median wall time of ``repeats`` runs, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--naive-images", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n = args.images

    with tempfile.TemporaryDirectory() as tmp:
        (study,) = generate_studies(
            Task.HEAD_CT_HEMORRHAGE, Label.POSITIVE, 1, Path(tmp), seed=1, slices=n
        )
        files = sorted(study.glob("*/*.dcm"))
        syntax = dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID.name
        name = "head-ct-hemorrhage-demo"
        rows: list[tuple[str, float]] = []
        for policy in ("key", "positive"):
            model = load_models([], batch_size=args.batch_size, heatmaps=policy)[name]
            model.predict_series(files[: args.batch_size])  # first-call effects out of the way
            seconds = best_of(args.repeats, functools.partial(model.predict_series, files))
            rows.append((f"end to end, files -> SeriesPrediction (heatmaps={policy})", n / seconds))
        card = model.card
        decode = best_of(
            args.repeats,
            lambda: [to_model_input(dcmread(p), card.input, card.preprocessing) for p in files],
        )
        rows.append(("decode + preprocess only (no network)", n / decode))
        inputs = np.stack(
            [to_model_input(dcmread(p), card.input, card.preprocessing) for p in files]
        )
        batch = inputs[: args.batch_size]
        steps = max(1, n // args.batch_size)
        compute = best_of(args.repeats, lambda: [model.predict_batch(batch) for _ in range(steps)])
        rows.append((COMPUTE, steps * len(batch) / compute))
        explain = best_of(
            args.repeats, lambda: [model.predict_batch(batch, explain=True) for _ in range(steps)]
        )
        rows.append(("compute + Grad-CAM for every image", steps * len(batch) / explain))
        backend = LoadedModel(model.package, batch_size=1).backend
        assert isinstance(backend, KerasBackend)
        naive_model = backend.model
        k = args.naive_images
        naive = best_of(1, lambda: [naive_model.predict(x[None], verbose=0) for x in inputs[:k]])
        rows.append((f"naive model.predict per image ({k} images)", k / naive))

    reference = dict(rows)[COMPUTE]
    print(f"{n} images of {card.input.height}x{card.input.width}, {name}, batch {args.batch_size},")
    print(f"source 256x256 CT slices, transfer syntax {syntax}")
    print(f"{'path':62} {'images/s':>9} {'vs compute':>10}")
    for label, rate in rows:
        print(f"{label:62} {rate:9.1f} {rate / reference:10.2f}")


if __name__ == "__main__":
    main()
