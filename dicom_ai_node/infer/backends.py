"""Model backends: the network of a package, whatever framework saved it.

A package holds exactly one of ``model.keras`` (Keras 3), ``saved_model/`` (a TensorFlow
SavedModel with a ``serving_default`` signature) or ``model.onnx`` (run with ONNX Runtime).
Each backend runs fixed-size batches of preprocessed images (NHWC float32) and, where it can,
explains them:

- Keras: Grad-CAM (Selvaraju et al. 2017) on the card's ``explain_layer``;
- SavedModel: the gradient of the positive probability with respect to the input (Simonyan et
  al. 2014), since a SavedModel keeps no layers to take activations from;
- ONNX: occlusion (Zeiler and Fergus 2014), forward passes only: an 8x8 grid of patches is
  masked in turn and the drop of the positive probability is the map. It costs 64 forward
  passes per image, so it is made for the key image only.

A card can ask for ``explanation = "none"``: then no map is made and the result says so.
TensorFlow and ONNX Runtime are imported only by the backend that needs them.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dicom_ai_node.infer.card import ModelCard

#: Weights file or folder name -> backend kind, in the order they are looked for.
WEIGHTS = {"model.keras": "keras", "saved_model": "saved_model", "model.onnx": "onnx"}

#: What each explanation method is called in results and cards.
EXPLANATION_NAMES = {
    "gradcam": "Grad-CAM",
    "input_gradient": "input gradient saliency",
    "occlusion": "occlusion",
    "none": "none",
}

_DEFAULT_EXPLANATION = {"keras": "gradcam", "saved_model": "input_gradient", "onnx": "occlusion"}
_OCCLUSION_GRID = 8

Array = npt.NDArray[np.float32]


class BackendError(Exception):
    """The weights cannot be loaded or do not match the card (the caller names the package)."""


def weights_path(package: Path) -> Path:
    """The one weights file or folder of a package; :class:`BackendError` if none or several."""
    found = [package / name for name in WEIGHTS if (package / name).exists()]
    if not found:
        raise BackendError("no weights (model.keras, saved_model/ or model.onnx)")
    if len(found) > 1:
        raise BackendError(f"more than one set of weights: {', '.join(p.name for p in found)}")
    return found[0]


def weights_sha256(path: Path) -> str:
    """SHA-256 of a weights file, or of a SavedModel folder (each file's relative path and
    content, in sorted order), as hex."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


class Backend(ABC):
    """A loaded network: batched forward pass and, maybe, heat maps of the positive label."""

    kind: str
    #: The explanation method's key in :data:`EXPLANATION_NAMES`.
    explanation: str
    #: True when maps cost about one more pass (so they may be made for every image).
    explain_in_pass: bool
    #: True when the network takes only full batches of ``batch_size`` (shorter ones are
    #: zero-padded); False when it takes any batch size up to it.
    fixed_batch: bool = False

    def __init__(self, card: ModelCard, batch_size: int, positive_index: int) -> None:
        self.card = card
        self.batch_size = batch_size
        self.positive_index = positive_index
        self.shape = (batch_size, card.input.height, card.input.width, card.input.channels)

    def _check(self, input_shape: tuple[Any, ...], outputs: Any) -> None:
        card = self.card
        expected = (card.input.height, card.input.width, card.input.channels)
        problems = []
        if tuple(input_shape) != expected:
            problems.append(f"card input is {expected} but the weights take {tuple(input_shape)}")
        if outputs != len(card.labels):
            problems.append(
                f"card has {len(card.labels)} labels but the weights have {outputs} outputs"
            )
        if problems:
            raise BackendError("; ".join(problems))

    def _explanation(self, supported: tuple[str, ...]) -> str:
        wanted = self.card.explanation
        method = _DEFAULT_EXPLANATION[self.kind] if wanted == "auto" else wanted
        if method not in (*supported, "none"):
            raise BackendError(f"explanation {wanted!r} is not available for {self.kind} weights")
        return method

    @property
    @abstractmethod
    def parameters(self) -> int | None:
        """Number of weights of the network, when the format tells it."""

    @abstractmethod
    def forward(self, batch: Array) -> Array:
        """Probabilities (batch, labels) of a batch (a full one when ``fixed_batch``)."""

    @abstractmethod
    def explain(self, batch: Array, count: int) -> tuple[Array, Array]:
        """Probabilities and maps (batch, height, width) in [0, 1] of a batch whose first
        ``count`` images are real (the rest is padding, which may get empty maps)."""


class KerasBackend(Backend):
    """``model.keras`` through one ``tf.function`` per pass, traced once at warm-up for any
    batch size (``model.predict`` costs ~10x more per call: it builds a dataset each time)."""

    kind = "keras"
    explain_in_pass = True

    def __init__(self, path: Path, card: ModelCard, batch_size: int, positive_index: int) -> None:
        super().__init__(card, batch_size, positive_index)
        import keras
        import tensorflow as tf

        try:
            self.model: keras.Model = keras.models.load_model(path, compile=False)
        except Exception as exc:  # Keras raises many types for a corrupt file
            raise BackendError(f"cannot load model.keras: {exc}") from exc
        self._check(self.model.input_shape[1:], self.model.output_shape[-1])
        self.explanation = self._explanation(("gradcam",))
        spec = tf.TensorSpec((None, *self.shape[1:]), tf.float32)
        self._forward = tf.function(self._forward_fn, input_signature=[spec])
        self._explain = None
        if self.explanation == "gradcam":
            layer = self._explain_layer_name()
            self._explain = tf.function(self._gradcam(layer), input_signature=[spec])

    @property
    def parameters(self) -> int:
        return int(self.model.count_params())

    def _explain_layer_name(self) -> str:
        names = [layer.name for layer in self.model.layers]
        if self.card.explain_layer is not None:
            if self.card.explain_layer not in names:
                raise BackendError(f"explain_layer {self.card.explain_layer!r} is not a layer")
            return self.card.explain_layer
        for layer in reversed(self.model.layers):
            if len(layer.output.shape) == 4 and type(layer).__name__.startswith("Conv"):
                return str(layer.name)
        raise BackendError("the weights have no 2-D convolution layer for Grad-CAM")

    def _forward_fn(self, images: Any) -> Any:
        return self.model(images, training=False)

    def _gradcam(self, layer: str) -> Any:
        """Grad-CAM of the positive label, batched.

        The class score is the pre-softmax logit when the last layer is a softmax/sigmoid
        activation (gradients of a saturated probability vanish). Images in a batch are
        independent, so the gradient of the batch's summed score gives each image its own map.
        """
        import keras
        import tensorflow as tf

        model = self.model
        last = model.layers[-1]
        score_tensor = last.input if isinstance(last, keras.layers.Activation) else model.output
        grad_model = keras.Model(
            model.inputs, [model.get_layer(layer).output, score_tensor, model.output]
        )
        height, width = self.card.input.height, self.card.input.width
        index = self.positive_index

        def explain(images: Any) -> Any:
            with tf.GradientTape() as tape:
                features, scores, probabilities = grad_model(images, training=False)
                score = tf.reduce_sum(scores[:, index])
            grads = tape.gradient(score, features)
            weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
            cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1, keepdims=True))
            cam = tf.image.resize(cam, (height, width), method="bilinear")[..., 0]
            peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
            return probabilities, tf.math.divide_no_nan(cam, peak)

        return explain

    def forward(self, batch: Array) -> Array:
        return np.asarray(self._forward(batch), dtype=np.float32)

    def explain(self, batch: Array, count: int) -> tuple[Array, Array]:
        assert self._explain is not None
        probabilities, cams = self._explain(batch)
        return np.asarray(probabilities, np.float32), np.asarray(cams, np.float32)


class SavedModelBackend(Backend):
    """A TensorFlow SavedModel folder: its ``serving_default`` signature, one input, one
    output (probabilities)."""

    kind = "saved_model"
    explain_in_pass = True

    def __init__(self, path: Path, card: ModelCard, batch_size: int, positive_index: int) -> None:
        super().__init__(card, batch_size, positive_index)
        import tensorflow as tf

        try:
            loaded = tf.saved_model.load(str(path))
            signature = loaded.signatures["serving_default"]
        except Exception as exc:  # TensorFlow raises many types for a corrupt folder
            raise BackendError(f"cannot load saved_model/: {exc}") from exc
        self._loaded = loaded  # keeps the signature's variables alive
        inputs = signature.structured_input_signature[1]
        outputs = signature.structured_outputs
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackendError(
                f"saved_model/ signature must have one input and one output, "
                f"has {len(inputs)} and {len(outputs)}"
            )
        (input_name, input_spec), (output_spec,) = next(iter(inputs.items())), outputs.values()
        self._check(tuple(input_spec.shape[1:]), output_spec.shape[-1])
        self.explanation = self._explanation(("input_gradient",))
        self.fixed_batch = input_spec.shape[0] is not None
        self._variables = sum(int(np.prod(v.shape)) for v in signature.variables)

        def run(images: Any) -> Any:
            return next(iter(signature(**{input_name: images}).values()))

        def saliency(images: Any) -> Any:
            with tf.GradientTape() as tape:
                tape.watch(images)
                probabilities = run(images)
                score = tf.reduce_sum(probabilities[:, positive_index])
            grads = tf.reduce_max(tf.abs(tape.gradient(score, images)), axis=-1)
            peak = tf.reduce_max(grads, axis=(1, 2), keepdims=True)
            return probabilities, tf.math.divide_no_nan(grads, peak)

        spec = tf.TensorSpec(
            self.shape if self.fixed_batch else (None, *self.shape[1:]), tf.float32
        )
        self._forward = tf.function(run, input_signature=[spec])
        self._explain = tf.function(saliency, input_signature=[spec])

    @property
    def parameters(self) -> int:
        return self._variables

    def forward(self, batch: Array) -> Array:
        return np.asarray(self._forward(batch), dtype=np.float32)

    def explain(self, batch: Array, count: int) -> tuple[Array, Array]:
        probabilities, maps = self._explain(batch)
        return np.asarray(probabilities, np.float32), np.asarray(maps, np.float32)


class OnnxBackend(Backend):
    """``model.onnx`` through ONNX Runtime: first input NHWC (or NCHW with the card's
    ``input.layout``), first output probabilities."""

    kind = "onnx"
    explain_in_pass = False

    def __init__(
        self,
        path: Path,
        card: ModelCard,
        batch_size: int,
        positive_index: int,
        threads: int = 0,
    ) -> None:
        super().__init__(card, batch_size, positive_index)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=ort.get_available_providers()
            )
        except Exception as exc:  # onnxruntime raises its own types for a corrupt file
            raise BackendError(f"cannot load model.onnx: {exc}") from exc
        first_in, first_out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self._input = first_in.name
        self._nchw = card.input.layout == "NCHW"
        dims = tuple(first_in.shape[1:])
        if self._nchw:
            dims = (*dims[1:], dims[0])
        self._check(dims, first_out.shape[-1])
        self.fixed_batch = isinstance(first_in.shape[0], int)
        self.explanation = self._explanation(("occlusion",))
        self._parameters = _onnx_parameters(path)

    @property
    def parameters(self) -> int | None:
        return self._parameters

    def forward(self, batch: Array) -> Array:
        feed = batch.transpose(0, 3, 1, 2) if self._nchw else batch
        (probabilities, *_) = self.session.run(None, {self._input: feed})
        return np.asarray(probabilities, dtype=np.float32)

    def explain(self, batch: Array, count: int) -> tuple[Array, Array]:
        probabilities = self.forward(batch)
        maps = np.zeros(batch.shape[:3], dtype=np.float32)
        for i in range(count):
            maps[i] = self._occlusion(batch[i], probabilities[i])
        return probabilities, maps

    def _occlusion(self, image: Array, probabilities: Array) -> Array:
        """Drop of the positive probability when each cell of an 8x8 grid is set to the
        image's mean, as a map at the input size scaled to [0, 1]."""
        height, width, _ = image.shape
        grid = _OCCLUSION_GRID
        rows = np.linspace(0, height, grid + 1).astype(int)
        cols = np.linspace(0, width, grid + 1).astype(int)
        cells = [(r, c) for r in range(grid) for c in range(grid)]
        masked = np.repeat(image[np.newaxis], len(cells), axis=0)
        fill = float(image.mean())
        for k, (r, c) in enumerate(cells):
            masked[k, rows[r] : rows[r + 1], cols[c] : cols[c + 1]] = fill
        scores = np.empty(len(cells), dtype=np.float32)
        for start in range(0, len(cells), self.batch_size):
            chunk = masked[start : start + self.batch_size]
            batch = chunk
            if self.fixed_batch:
                batch = np.zeros(self.shape, dtype=np.float32)
                batch[: len(chunk)] = chunk
            scores[start : start + len(chunk)] = self.forward(batch)[
                : len(chunk), self.positive_index
            ]
        drop = np.maximum(probabilities[self.positive_index] - scores, 0.0)
        out = np.zeros((height, width), dtype=np.float32)
        for k, (r, c) in enumerate(cells):
            out[rows[r] : rows[r + 1], cols[c] : cols[c + 1]] = drop[k]
        peak = out.max()
        return out / peak if peak > 0 else out


def _onnx_parameters(path: Path) -> int | None:
    """Number of weights in the graph's initializers, when the ``onnx`` package is present."""
    try:
        import onnx
    except ImportError:
        return None
    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(int(np.prod(t.dims)) for t in graph.initializer)


def load_backend(
    package: Path, card: ModelCard, batch_size: int, positive_index: int, threads: int = 0
) -> tuple[Backend, Path]:
    """The backend for a package's weights, and the weights' path."""
    path = weights_path(package)
    kind = WEIGHTS[path.name]
    if kind == "onnx":
        return OnnxBackend(path, card, batch_size, positive_index, threads), path
    if kind == "saved_model":
        return SavedModelBackend(path, card, batch_size, positive_index), path
    return KerasBackend(path, card, batch_size, positive_index), path
