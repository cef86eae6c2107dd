"""Images/second of the node's inference runtime against the backend's raw compute.

Usage: ``.venv/bin/python benchmarks/inference.py [--quick] [--images 200] [--sizes 224 512]
[--backends tensorflow onnx] [--repeats 3] [--batch-size 0] [--threads 0] [--part all]``

On one synthetic head CT series (``--images`` slices of 256x256):

1. ``demo``: the bundled head-ct-hemorrhage-demo model (128x128): end to end
   (``LoadedModel.predict_series`` from the files, heat maps for the key image and for the
   positive ones), decode + preprocess only, compute only (the compiled call on pre-built
   batches), compute + Grad-CAM, and the naive ``model.predict`` per image.
2. ``networks``: DenseNet-121 (``keras.applications``, ``weights=None``: nothing downloaded,
   untrained is fine for speed; one input channel, two softmax outputs) at each ``--sizes``,
   packaged as ``model.keras`` (TensorFlow, Grad-CAM) and as ``model.onnx`` exported from the
   same weights (ONNX Runtime, occlusion map of the key image). Each backend and size runs in a
   fresh process, so that its peak RSS is its own. It prints the raw compute (the runtime's
   batched call on the series' pre-built inputs), end to end without heat maps (a card with
   ``explanation = "none"``), with the key image's map and (TensorFlow) with maps for every
   image, each with its ratio to the raw compute, seconds per series and CPU seconds per image.

Batch size and threads are the node's automatic choice unless ``--batch-size`` (into the card)
or ``--threads`` (``configure_threads``) say otherwise. Each repeat measures the raw compute and
then the end-to-end paths, and the ratio is taken within the repeat; the medians over the
repeats are printed, with each repeat's ratios, since on a shared machine the load changes
between measurements. ``--quick``: 16 slices, DenseNet at 64x64, one repeat (a smoke run).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from pydicom import dcmread

from dicom_ai_node.infer import LoadedModel, load_models
from dicom_ai_node.infer.backends import KerasBackend
from dicom_ai_node.infer.card import InputSpec, ModelCard
from dicom_ai_node.infer.preprocess import to_model_input
from dicom_ai_node.infer.runtime import configure_tensorflow, configure_threads, read_card
from dicom_ai_node.synth import Label, Task, generate_studies
from dicom_ai_node.train.tasks import TASK_CARDS

BACKENDS = {"tensorflow": "model.keras", "onnx": "model.onnx"}


@dataclass(frozen=True)
class Timing:
    """Wall and process CPU seconds of one run."""

    wall: float
    cpu: float


def timed(run: Callable[[], object]) -> Timing:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def median_time(repeats: int, run: Callable[[], object]) -> float:
    """Median wall time of ``repeats`` runs, in seconds."""
    return statistics.median(timed(run).wall for _ in range(repeats))


def peak_rss_mb() -> float:
    """This process's peak resident memory (``VmHWM``: unlike ``getrusage``'s maximum, it does
    not carry the parent's over into a spawned child)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def decoded(model: LoadedModel, files: list[Path]) -> np.ndarray:
    """The series' model inputs, decoded and preprocessed as the runtime does."""
    card = model.card
    return np.stack([to_model_input(dcmread(p), card.input, card.preprocessing) for p in files])


def compute(model: LoadedModel, inputs: np.ndarray, *, explain: bool = False) -> None:
    """The runtime's batched call on pre-built inputs: the network and nothing around it."""
    for start in range(0, len(inputs), model.batch_size):
        model.predict_batch(inputs[start : start + model.batch_size], explain=explain)


def demo(files: list[Path], args: argparse.Namespace) -> None:
    """Part 1: the bundled 128x128 demo model, each path against its compute-only rate."""
    n, name = len(files), "head-ct-hemorrhage-demo"
    batch_size = args.batch_size or None
    rows: list[tuple[str, float]] = []
    for policy in ("key", "positive"):
        model = load_models([], batch_size=batch_size, heatmaps=policy)[name]
        model.predict_series(files[: model.batch_size])  # first-call effects out of the way
        seconds = median_time(args.repeats, functools.partial(model.predict_series, files))
        rows.append((f"end to end, files -> SeriesPrediction (heatmaps={policy})", n / seconds))
    seconds = median_time(args.repeats, lambda: decoded(model, files))
    rows.append(("decode + preprocess only (no network)", n / seconds))
    inputs = decoded(model, files)
    reference = n / median_time(args.repeats, lambda: compute(model, inputs))
    rows.append(("compute only, the compiled call on pre-built batches", reference))
    seconds = median_time(args.repeats, lambda: compute(model, inputs, explain=True))
    rows.append(("compute + Grad-CAM for every image", n / seconds))
    backend = LoadedModel(model.package, batch_size=1).backend
    assert isinstance(backend, KerasBackend)
    k = min(n, args.naive_images)
    seconds = timed(lambda: [backend.model.predict(x[None], verbose=0) for x in inputs[:k]]).wall
    rows.append((f"naive model.predict per image ({k} images)", k / seconds))
    print(
        f"\n{name} ({model.card.input.height}x{model.card.input.width}), batch "
        f"{model.batch_size}, threads {model.threads.intra_op}/{model.threads.inter_op}"
    )
    print(f"{'path':62} {'images/s':>9} {'vs compute':>10}")
    for label, rate in rows:
        print(f"{label:62} {rate:9.1f} {rate / reference:10.2f}")


def write_densenet(root: Path, size: int, batch_size: int) -> dict[str, Path]:
    """The same DenseNet-121 as a Keras and as an ONNX package, cards without a batch size
    (the node's automatic one) unless ``batch_size``."""
    import keras

    card = TASK_CARDS[Task.HEAD_CT_HEMORRHAGE].model_copy(
        update={
            "input": InputSpec(height=size, width=size),
            "explain_layer": None,
            "batch_size": batch_size or None,
        }
    )
    network = keras.applications.DenseNet121(
        weights=None, input_shape=(size, size, 1), classes=2, classifier_activation="softmax"
    )
    network(np.zeros((1, size, size, 1), dtype=np.float32))
    packages = {}
    for backend, weights in BACKENDS.items():
        package = root / f"densenet121-{size}-{backend}"
        package.mkdir()
        if backend == "onnx":
            network.export(package / weights, format="onnx", verbose=False)
        else:
            network.save(package / weights)
        card.model_copy(update={"name": package.name}).dump(package / "model.toml")
        packages[backend] = package
    return packages


def measure_network(
    package: Path, files: list[Path], repeats: int, threads: int
) -> dict[str, object]:
    """Raw compute and the end-to-end paths of one package, in this (fresh) process."""
    configure_threads(threads)
    card: ModelCard = read_card(package)
    variants = {
        "end to end, no heat maps": LoadedModel(
            package, card=card.model_copy(update={"explanation": "none"}), heatmaps="key"
        ),
        "end to end, key image's map": LoadedModel(package, card=card, heatmaps="key"),
    }
    if variants["end to end, key image's map"].backend.explain_in_pass:
        variants["end to end, maps for every image"] = LoadedModel(
            package, card=card, heatmaps="all"
        )
    raw_model = variants["end to end, no heat maps"]
    inputs = decoded(raw_model, files)
    decode = timed(lambda: decoded(raw_model, files))
    for model in variants.values():
        model.predict_series(files[: model.batch_size])  # first-call effects out of the way
    runs: dict[str, list[Timing]] = {"raw compute": [], **{label: [] for label in variants}}
    for _ in range(repeats):
        runs["raw compute"].append(timed(lambda: compute(raw_model, inputs)))
        for label, model in variants.items():
            runs[label].append(timed(lambda m=model: m.predict_series(files)))  # type: ignore[misc]
    return {
        "batch": raw_model.batch_size,
        "threads": f"{raw_model.threads.intra_op}/{raw_model.threads.inter_op}",
        "decode": len(files) / decode.wall,
        "runs": runs,
        "peak_mb": peak_rss_mb(),
    }


def networks(files: list[Path], root: Path, args: argparse.Namespace) -> None:
    """Part 2: DenseNet-121 per size and backend, each in a fresh process."""
    n = len(files)
    spawn = get_context("spawn")
    for size in args.sizes:
        packages = write_densenet(root, size, args.batch_size)
        for backend in args.backends:
            with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                result = pool.submit(
                    measure_network, packages[backend], files, args.repeats, args.threads
                ).result()
            runs: dict[str, list[Timing]] = result["runs"]  # type: ignore[assignment]
            raw = runs["raw compute"]
            print(
                f"\ndensenet121 {size}x{size}, {backend}: batch {result['batch']}, threads "
                f"{result['threads']} (intra/inter), decode + preprocess only "
                f"{result['decode']:.0f} img/s, peak RSS {result['peak_mb']:.0f} MB"
            )
            print(
                f"{'path':32} {'img/s':>7} {'ratio':>6} {'s/series':>8} {'cpu s/img':>9}"
                "  ratio per repeat"
            )
            for label, timings in runs.items():
                ratios = [r.wall / t.wall for r, t in zip(raw, timings, strict=True)]
                wall = statistics.median(t.wall for t in timings)
                cpu = statistics.median(t.cpu for t in timings)
                print(
                    f"{label:32} {n / wall:7.2f} {statistics.median(ratios):6.2f} {wall:8.1f} "
                    f"{cpu / n:9.3f}  {' '.join(f'{r:.2f}' for r in ratios)}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: small and once")
    parser.add_argument("--images", type=int, help="slices in the series (200; quick 16)")
    parser.add_argument("--sizes", type=int, nargs="+", help="DenseNet inputs (224 512; quick 64)")
    parser.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=list(BACKENDS))
    parser.add_argument("--repeats", type=int, help="measurements of each path (3; quick 1)")
    parser.add_argument("--batch-size", type=int, default=0, help="0: the card's or automatic")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads, 0: automatic")
    parser.add_argument("--naive-images", type=int, default=50)
    parser.add_argument("--part", choices=["all", "demo", "networks"], default="all")
    args = parser.parse_args()
    args.images = args.images or (16 if args.quick else 200)
    args.sizes = args.sizes or ([64] if args.quick else [224, 512])
    args.repeats = args.repeats or (1 if args.quick else 3)
    configure_threads(args.threads)
    configure_tensorflow()
    with tempfile.TemporaryDirectory() as tmp:
        (study,) = generate_studies(
            Task.HEAD_CT_HEMORRHAGE, Label.POSITIVE, 1, Path(tmp), seed=1, slices=args.images
        )
        files = sorted(study.glob("*/*.dcm"))
        syntax = dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID.name
        print(f"{len(files)} slices of 256x256 CT, transfer syntax {syntax}")
        if args.part in ("all", "demo"):
            demo(files, args)
        if args.part in ("all", "networks"):
            networks(files, Path(tmp), args)


if __name__ == "__main__":
    main()
