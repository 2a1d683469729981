"""Procedural texture dataset for the demo: a classification task without downloading anything.

Each class is a texture family whose parameters (orientation, scale, colours, noise, ...) are
drawn anew for every image. Colours come from one distribution shared by all classes and the
scale ranges of the families overlap, so a fragment cannot be classified by its mean colour or
brightness alone; the structure (stripes, blobs, cracks, fibres, clouds, weave) has to be learnt.
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from rich.progress import track

from node_payload.common.errors import UserError

Pattern = Callable[[np.random.Generator, int], np.ndarray]


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    axis = np.arange(size, dtype=np.float32)
    return axis[None, :], axis[:, None]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid upsampled bicubically."""
    coarse = Image.fromarray(rng.random((cells + 1, cells + 1), dtype=np.float32), mode="F")
    fine = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC))
    return np.clip(fine, 0.0, 1.0)


def _normalise(field: np.ndarray) -> np.ndarray:
    low, high = np.percentile(field[::8, ::8], [1, 99])
    return np.clip((field - low) / max(high - low, 1e-6), 0.0, 1.0)


def _grain(rng: np.random.Generator, size: int) -> np.ndarray:
    """Oriented stripes bent by smooth noise: wood grain."""
    x, y = _grid(size)
    theta = rng.uniform(0, np.pi)
    period = rng.uniform(9, 18)
    warp = _smooth_noise(rng, size, int(rng.integers(3, 8))) * rng.uniform(2, 10)
    phase = (x * np.cos(theta) + y * np.sin(theta)) / period + warp
    return 0.5 + 0.5 * np.sin(2 * np.pi * phase)


def _cells(rng: np.random.Generator, size: int) -> np.ndarray:
    """Scattered filled circles with dark rims: cells under a microscope."""
    image = Image.new("F", (size, size), 0.0)
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(4, 9)
    count = int(rng.uniform(0.5, 0.85) * size * size / (np.pi * radius**2))
    for cx, cy, r in zip(
        rng.uniform(0, size, count),
        rng.uniform(0, size, count),
        radius * rng.uniform(0.6, 1.4, count),
        strict=True,
    ):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=1.0, outline=0.35, width=2)
    return np.asarray(image)


def _mosaic(rng: np.random.Generator, size: int) -> np.ndarray:
    """Voronoi cells of random shades separated by dark cracks (F2 - F1 distance)."""
    cell = rng.uniform(12, 26)
    n = int(np.ceil(size / cell)) + 2
    jitter = rng.random((n, n, 2), dtype=np.float32)
    shades = rng.random((n, n), dtype=np.float32)
    x, y = _grid(size)
    gx, gy = (x / cell).astype(int) + 1, (y / cell).astype(int) + 1
    gx, gy = np.broadcast_to(gx, (size, size)), np.broadcast_to(gy, (size, size))
    first = np.full((size, size), np.inf, np.float32)
    second = np.full((size, size), np.inf, np.float32)
    shade = np.zeros((size, size), np.float32)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            iy, ix = np.clip(gy + dy, 0, n - 1), np.clip(gx + dx, 0, n - 1)
            px = (ix - 1 + jitter[iy, ix, 0]) * cell
            py = (iy - 1 + jitter[iy, ix, 1]) * cell
            d = np.hypot(px - x, py - y)
            closer = d < first
            second = np.where(closer, first, np.minimum(second, d))
            shade = np.where(closer, shades[iy, ix], shade)
            first = np.minimum(first, d)
    crack = np.clip((second - first) / rng.uniform(1.5, 3.5), 0.0, 1.0)
    return (0.3 + 0.7 * shade) * crack


def _fibres(rng: np.random.Generator, size: int) -> np.ndarray:
    """Random straight line segments of random widths: a fibre mat."""
    image = Image.new("F", (size, size), 0.0)
    draw = ImageDraw.Draw(image)
    length = rng.uniform(20, 70)
    count = int(rng.uniform(1.5, 3.5) * size * size / (length * 12))
    main = rng.uniform(0, np.pi)
    spread = rng.uniform(0.3, np.pi)
    angles = main + rng.uniform(-spread, spread, count)
    lengths = length * rng.uniform(0.5, 1.5, count)
    x0, y0 = rng.uniform(-length, size, count), rng.uniform(-length, size, count)
    x1, y1 = x0 + lengths * np.cos(angles), y0 + lengths * np.sin(angles)
    widths, shades = rng.integers(1, 4, count), rng.uniform(0.4, 1.0, count)
    for segment in zip(x0, y0, x1, y1, widths, shades, strict=True):
        draw.line(segment[:4], fill=float(segment[5]), width=int(segment[4]))
    return np.asarray(image)


def _clouds(rng: np.random.Generator, size: int) -> np.ndarray:
    """Multi-octave smooth noise with fine speckle: clouds / stained tissue."""
    octaves = [_smooth_noise(rng, size, cells) for cells in (size // 48, size // 24, size // 12)]
    weights = rng.dirichlet([2.0, 2.0, 2.0])
    return _normalise(sum(w * o for w, o in zip(weights, octaves, strict=True)))


def _weave(rng: np.random.Generator, size: int) -> np.ndarray:
    """Two perpendicular thread sets going over and under each other: woven cloth / checker."""
    x, y = _grid(size)
    theta = rng.uniform(0, np.pi / 2)
    period = rng.uniform(10, 18)
    u = (x * np.cos(theta) + y * np.sin(theta)) / period
    v = (-x * np.sin(theta) + y * np.cos(theta)) / period
    threads_u = np.abs(np.sin(np.pi * u))
    threads_v = np.abs(np.sin(np.pi * v))
    over = (np.floor(u) + np.floor(v)) % 2 == 0
    return np.where(over, threads_u * 0.9 + 0.1, threads_v * 0.6)


FAMILIES: dict[str, Pattern] = {
    "cells": _cells,
    "clouds": _clouds,
    "fibres": _fibres,
    "grain": _grain,
    "mosaic": _mosaic,
    "weave": _weave,
}


def _colourise(rng: np.random.Generator, pattern: np.ndarray) -> np.ndarray:
    """Map a [0, 1] pattern between two colour fields, then blur and add sensor noise.

    The dark and light colours drift smoothly across the image, so colour varies as much within
    one image as between images: it identifies neither the class nor the source image, and a
    network has to learn the structure.
    """
    size = pattern.shape[0]
    fields = np.stack([_smooth_noise(rng, size, int(rng.integers(2, 5))) for _ in range(6)], -1)
    dark, light = 0.55 * fields[..., :3], 0.45 + 0.55 * fields[..., 3:]
    contrast = rng.uniform(0.75, 1.0)
    t = 0.5 + (pattern[:, :, None] - 0.5) * contrast
    rgb = dark + (light - dark) * t
    rgb += rng.uniform(0.02, 0.04) * rng.standard_normal((*pattern.shape, 1), dtype=np.float32)
    image = Image.fromarray((np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8), "RGB")
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 0.7)))


def generate(
    out_dir: Path,
    classes: int = 6,
    images_per_class: int = 8,
    size: int = 1000,
    seed: int = 0,
    progress: bool = True,
    height: int = 0,
) -> Path:
    """Write out_dir/<class>/<i>.png (an ImageFolder tree for `prepare`) and return out_dir.

    Images are size x size, or size wide and `height` high (e.g. 2272 x 1704 like microscopy).
    """
    if not 2 <= classes <= len(FAMILIES):
        raise UserError(f"textures: classes must be between 2 and {len(FAMILIES)}, not {classes}")
    if images_per_class < 1 or size < 16:
        raise UserError("textures: images_per_class must be >= 1 and size >= 16")
    out_dir = Path(out_dir)
    jobs = [(name, i) for name in list(FAMILIES)[:classes] for i in range(images_per_class)]
    for name, i in track(jobs, description="Generating textures", disable=not progress):
        rng = np.random.Generator(np.random.PCG64([seed, list(FAMILIES).index(name), i]))
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        side = max(size, height)
        image = _colourise(rng, FAMILIES[name](rng, side).astype(np.float32))
        image = image.crop((0, 0, size, height or size))
        image.save(out_dir / name / f"{i}.png", compress_level=1)
    return out_dir
