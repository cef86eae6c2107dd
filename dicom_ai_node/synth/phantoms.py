"""Pixel phantoms: chest radiographs with and without lung opacity, head CT with and without an
intracranial hyperdensity.

Pure numpy, deterministic given a ``numpy.random.Generator``. Radiographs are drawn in display
space (0 = black, 1 = white, i.e. attenuation); CT in Hounsfield units. The shapes are crude
but anatomical: body outline, lungs with vessel texture, ribs, clavicles, spine, mediastinum and
heart, diaphragm domes; skull, scalp, grey/white matter, ventricles and sulci.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Float = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]


def _grid(size: int) -> tuple[Float, Float]:
    """Normalised (y, x) coordinates in [-1, 1], y downwards."""
    axis = np.linspace(-1.0, 1.0, size)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    return yy, xx


def _ellipse(yy: Float, xx: Float, cy: float, cx: float, ry: float, rx: float) -> Float:
    """Squared normalised radius of each pixel for an axis-aligned ellipse (< 1 inside)."""
    return np.asarray(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2, dtype=np.float64)


def _blur(image: Float, sigma: float) -> Float:
    """Gaussian blur of ``sigma`` pixels, by FFT (periodic edges; phantoms have dark borders)."""
    if sigma <= 0:
        return image
    fy = np.fft.fftfreq(image.shape[0])[:, np.newaxis]
    fx = np.fft.rfftfreq(image.shape[1])[np.newaxis, :]
    kernel = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fy**2 + fx**2))
    return np.asarray(np.fft.irfft2(np.fft.rfft2(image) * kernel, s=image.shape), np.float64)


def _texture(rng: np.random.Generator, size: int, sigma: float) -> Float:
    """Smooth random texture with unit standard deviation."""
    field = _blur(rng.standard_normal((size, size)), sigma)
    return np.asarray(field / (field.std() + 1e-12), dtype=np.float64)


def chest_radiograph(rng: np.random.Generator, size: int, opacity: bool) -> Float:
    """A PA chest radiograph in display space [0, 1]; ``opacity`` adds airspace opacities."""
    yy, xx = _grid(size)
    px = 2.0 / size  # one pixel in normalised units
    shift_y, shift_x = rng.uniform(-0.04, 0.04, 2)
    scale = rng.uniform(0.92, 1.05)
    yy = (yy - shift_y) / scale
    xx = (xx - shift_x) / scale

    body = _ellipse(yy, xx, 0.15, 0.0, 1.15, rng.uniform(0.82, 0.9)) < 1
    image = np.where(body, 0.5, 0.04)
    lung_h, lung_w = rng.uniform(0.55, 0.65), rng.uniform(0.27, 0.31)
    lungs = np.zeros_like(body)
    for side in (-1, 1):
        lung = _ellipse(yy, xx, -0.05, side * 0.36, lung_h, lung_w) < 1
        dome = yy < 0.38 + 0.12 * ((xx - side * 0.36) / lung_w) ** 2 + rng.uniform(-0.04, 0.04)
        lungs |= lung & dome
    heart = _ellipse(yy, xx, 0.22, 0.1, 0.3, rng.uniform(0.24, 0.3)) < 1
    mediastinum = (np.abs(xx - 0.02) < 0.11) & (yy > -0.7) & body
    lungs &= ~heart & ~mediastinum
    vessels = 0.025 * _texture(rng, size, 2.5) + 0.03 * (1 - np.abs(xx) * 1.6).clip(0, 1)
    image = np.where(lungs, 0.16 + vessels, image)
    image = np.where(heart | mediastinum, 0.62, image)
    spine = (np.abs(xx) < 0.07) & body
    image = image + 0.12 * spine

    # Nine posterior ribs each side: bands along parabolas, spaced rib_gap apart vertically.
    rib_gap, u = rng.uniform(0.13, 0.16), np.abs(xx)
    phase = (yy + 0.62 - 0.35 * (u - 0.15) ** 2) / rib_gap
    nearest = np.round(phase)
    ribs = (np.abs(phase - nearest) * rib_gap < 0.022) & (nearest >= 0) & (nearest <= 8)
    image = image + 0.1 * (ribs & (u > 0.05) & (u < 0.72) & body)
    for side in (-1, 1):
        clavicle = np.abs(yy - (-0.72 + 0.18 * side * xx)) < 0.03
        image = image + 0.14 * (clavicle & (np.abs(xx) < 0.6) & (np.abs(xx) > 0.08) & body)

    if opacity:
        for _ in range(rng.integers(1, 4)):
            side = rng.choice([-1.0, 1.0])
            cy, cx = rng.uniform(-0.35, 0.3), side * rng.uniform(0.25, 0.48)
            ry, rx = rng.uniform(0.12, 0.24), rng.uniform(0.1, 0.17)
            blob = np.exp(-_ellipse(yy, xx, cy, cx, ry, rx) * 1.5)
            image = image + rng.uniform(0.3, 0.45) * blob * _blur(lungs.astype(float), 3)

    image = _blur(image, 1.2 * px * size / 256)
    image = image + rng.normal(0.0, 0.008, image.shape)
    return np.clip(image, 0.0, 1.0)


@dataclass(frozen=True)
class HeadGeometry:
    """One patient's head: its random shape, fixed across the slices of a series."""

    ry: float
    rx: float
    skull: float
    centre: tuple[float, float]
    ventricle: float
    grey_hu: float
    white_hu: float
    bleed: tuple[float, float, float, float, float] | None  # z, y, x, radius, HU

    @classmethod
    def random(cls, rng: np.random.Generator, hemorrhage: bool) -> HeadGeometry:
        bleed = None
        if hemorrhage:
            angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.45)
            bleed = (
                rng.uniform(-0.35, 0.35),
                dist * np.sin(angle) * 0.9,
                dist * np.cos(angle) * 0.7,
                rng.uniform(0.09, 0.17),
                rng.uniform(50.0, 90.0),
            )
        return cls(
            ry=rng.uniform(0.78, 0.86),
            rx=rng.uniform(0.62, 0.7),
            skull=rng.uniform(0.045, 0.065),
            centre=(rng.uniform(-0.04, 0.04), rng.uniform(-0.03, 0.03)),
            ventricle=rng.uniform(0.8, 1.25),
            grey_hu=rng.uniform(35.0, 42.0),
            white_hu=rng.uniform(24.0, 30.0),
            bleed=bleed,
        )

    def bleeds_at(self, z: float) -> bool:
        """Whether the hyperdensity crosses the slice at ``z`` (its cross-section radius > 0)."""
        return self.bleed is not None and abs(z - self.bleed[0]) < self.bleed[3] * 0.9


def head_ct_slice(rng: np.random.Generator, size: int, head: HeadGeometry, z: float) -> Float:
    """One axial slice in HU at height ``z`` in [-1, 1] (0 = mid-brain), noise included."""
    yy, xx = _grid(size)
    cy, cx = head.centre
    fraction = np.sqrt(max(0.05, 1.0 - (z / 1.15) ** 2))
    ry, rx = head.ry * fraction, head.rx * fraction
    r = _ellipse(yy, xx, cy, cx, ry, rx)
    inner = (1 - head.skull / min(ry, rx)) ** 2
    brain_r = (1 - 1.9 * head.skull / min(ry, rx)) ** 2

    image = np.full((size, size), -1000.0)
    image[r < 1.0] = 45.0  # scalp
    image[r < inner] = 1400.0  # skull
    brain = r < brain_r
    diploe = (r < (np.sqrt(inner) + np.sqrt(brain_r)) ** 2 / 4 * 1.02) & (r > brain_r * 1.04)
    image[diploe & (r < inner)] = 700.0
    texture = _texture(rng, size, 3.0)
    white = _ellipse(yy, xx, cy, cx, ry * 0.72, rx * 0.72) + 0.15 * texture < 1
    image[brain] = head.grey_hu
    image[brain & white] = head.white_hu
    sulci = brain & (r > brain_r * 0.75) & (_texture(rng, size, 1.5) > 1.6)
    image[sulci] = 8.0
    if abs(z) < 0.45:
        v = head.ventricle * (1 - abs(z) / 0.6)
        for side in (-1, 1):
            ventricle = _ellipse(yy, xx, cy - 0.05, cx + side * 0.08 * v, 0.22 * v, 0.06 * v) < 1
            image[ventricle & brain] = 6.0
    if head.bleed is not None and head.bleeds_at(z):
        bz, by, bx, radius, hu = head.bleed
        section = np.sqrt(max(radius**2 - (z - bz) ** 2, 1e-4))
        blob = _ellipse(yy, xx, cy + by * fraction, cx + bx * fraction, section, section) < 1
        image[blob & brain] = hu
    image = _blur(image, 0.7)
    return image + rng.normal(0.0, 4.0, image.shape)


def slice_heights(slices: int) -> Float:
    """Evenly spaced slice heights through the brain, inferior to superior."""
    return np.linspace(-0.7, 0.7, slices)
