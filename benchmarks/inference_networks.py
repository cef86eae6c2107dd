"""Real network sizes: DenseNet-121 at 224 and 512 on a 200-slice series, TensorFlow and ONNX.

Usage: ``.venv/bin/python benchmarks/inference_networks.py [--images 200] [--sizes 224 512]``

The network is ``keras.applications.DenseNet121(weights=None)`` with one input channel and
two softmax outputs (nothing is downloaded; untrained is fine for speed), packaged twice from
the same weights: ``model.keras`` (the TensorFlow backend, Grad-CAM heat maps) and
``model.onnx`` (exported with ``model.export(format="onnx")``, run by ONNX Runtime, occlusion
heat map of the key image). Batch size and threads come from the card (``batch_size``,
``threads``; ``--batch-size``, ``--threads`` here, 0 = one thread per core). For each backend
and size it prints:

- raw compute: the backend's batched forward pass on pre-built inputs (images/s);
- end to end: ``LoadedModel.predict_series`` from the DICOM files (read, decode, window,
  resize, infer, aggregate), with heat maps for the key image only and for every image
  (``heatmaps="all"``; ONNX makes its occlusion map for the key image whatever the policy);
- end to end / raw compute, seconds per series, and the process's peak RSS so far.
"""

from __future__ import annotations

import argparse
import functools
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom import dcmread

from dicom_ai_node.infer import LoadedModel, configure_tensorflow
from dicom_ai_node.infer.card import InputSpec
from dicom_ai_node.infer.preprocess import to_model_input
from dicom_ai_node.synth import Label, Task, generate_studies
from dicom_ai_node.train.tasks import TASK_CARDS


def seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def compute(model: LoadedModel, inputs: np.ndarray, steps: int) -> None:
    """``steps`` forward passes of the backend on one pre-built batch."""
    for _ in range(steps):
        model.backend.forward(inputs)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_packages(root: Path, size: int, batch_size: int, threads: int) -> dict[str, Path]:
    """The same DenseNet-121 as a Keras and as an ONNX package."""
    import keras

    card = TASK_CARDS[Task.HEAD_CT_HEMORRHAGE].model_copy(
        update={
            "input": InputSpec(height=size, width=size),
            "explain_layer": None,
            "batch_size": batch_size,
            "threads": threads,
        }
    )
    network = keras.applications.DenseNet121(
        weights=None, input_shape=(size, size, 1), classes=2, classifier_activation="softmax"
    )
    network(np.zeros((1, size, size, 1), dtype=np.float32))
    packages = {}
    for backend, weights in (("tensorflow", "model.keras"), ("onnx", "model.onnx")):
        package = root / f"densenet121-{size}-{backend}"
        package.mkdir()
        if backend == "onnx":
            network.export(package / weights, format="onnx", verbose=False)
        else:
            network.save(package / weights)
        card.model_copy(update={"name": package.name}).dump(package / "model.toml")
        packages[backend] = package
    return packages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--compute-images", type=int, default=64, help="images for raw compute")
    args = parser.parse_args()
    configure_tensorflow(args.threads, 0)
    header = (
        f"{'network':22} {'backend':10} {'raw img/s':>9} {'e2e img/s':>9} {'ratio':>6} "
        f"{'s/series':>8} {'+maps img/s':>11} {'ratio':>6} {'s/series':>8} {'peak MB':>8}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        (study,) = generate_studies(
            Task.HEAD_CT_HEMORRHAGE, Label.POSITIVE, 1, Path(tmp), seed=1, slices=args.images
        )
        files = sorted(study.glob("*/*.dcm"))
        for size in args.sizes:
            packages = write_packages(Path(tmp), size, args.batch_size, args.threads)
            for backend, package in packages.items():
                model = LoadedModel(package, heatmaps="key")
                card = model.card
                inputs = np.stack(
                    [
                        to_model_input(dcmread(p), card.input, card.preprocessing)
                        for p in files[: model.batch_size]
                    ]
                )
                steps = max(1, args.compute_images // model.batch_size)
                images = steps * model.batch_size
                raw = images / seconds(functools.partial(compute, model, inputs, steps))
                model.predict_series(files[: model.batch_size])  # first-call effects out
                key = seconds(functools.partial(model.predict_series, files))
                model.heatmaps = "all"
                every = seconds(functools.partial(model.predict_series, files))
                n = len(files)
                rows.append(
                    f"{'densenet121 ' + str(size):22} {backend:10} {raw:9.2f} {n / key:9.2f} "
                    f"{n / key / raw:6.2f} {key:8.1f} {n / every:11.2f} {n / every / raw:6.2f} "
                    f"{every:8.1f} {peak_rss_mb():8.0f}"
                )
                print(rows[-1], flush=True)
                del model
    print(f"{args.images} slices of 256x256 CT, batch {args.batch_size}, threads {args.threads}")
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
