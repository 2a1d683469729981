"""Cutting an image file into the fragments a run's model was trained on, a band of tile rows at
a time.

Training fragments are cut from the source image padded by reflection (`prepare` pads it by the
manifest's margin), at positions a stride apart, by rotating each position's context and cropping
the centred tile (node_payload.fragments.rotate_crop). This cuts the same fragments straight from
an image file: the same decoding rules (pipeline.dataset_prepare: 16-bit scaled by 1/257, grey or
RGB), the same padding, positions and rotation. The decoded image stays in PIL's own storage, as
stored (1 byte a pixel for 8-bit grey, 2 for 16-bit; an uncompressed TIFF is memory-mapped, not
read); only one band, the rows under one row of tile positions, is ever a numpy array, and never
a float one, so memory is bounded whatever the image's size.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from node_payload.common.manifest import Manifest, positions
from node_payload.fragments import rotate_crop
from pipeline.dataset_prepare import DECODE_ERRORS, BadImage, as_uint8, probe

# PIL refuses images over 179 Mpx as decompression bombs; a 20,000 x 20,000 slide is 400 Mpx.
# Memory here grows with the stored pixels (the bands are bounded), so the limit is raised to
# 2**30 px (32,768 x 32,768): 1 GiB in 8-bit grey.
MAX_PIXELS = 2**30
_MODES = {"L": "greyscale", "RGB": "colour (RGB)"}


class BadInput(Exception):
    """An image that cannot be classified; the message names the file and why."""


@dataclass(frozen=True)
class Tiling:
    """How the run's dataset cut its images: tile side, stride and reflection margin (pixels),
    and the pixel mode ("L" or "RGB")."""

    tile: int
    stride: int
    margin: int
    mode: str

    @classmethod
    def of(cls, manifest: Manifest) -> "Tiling":
        return cls(manifest.tile, manifest.stride, manifest.margin, manifest.mode)

    @property
    def context(self) -> int:
        """Side of the square cut around a tile before rotation."""
        return self.tile + 2 * self.margin


@dataclass(frozen=True)
class Probed:
    """An image checked from its header: readable, large enough, in the run's mode."""

    path: Path
    width: int
    height: int
    nx: int  # tile positions per row
    ny: int  # rows of tile positions

    def fragments(self, angles: int) -> int:
        return self.nx * self.ny * angles


@contextmanager
def _allow_large() -> Iterator[None]:
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def check(path: Path, tiling: Tiling) -> Probed:
    """Read the image's header: raises BadInput for an unreadable file, one smaller than the
    tile, or one in the other mode than the model's (grey or colour, as `prepare` decides)."""
    if not path.is_file():
        raise BadInput(f"{path}: no such image file; check the path")
    try:
        with _allow_large():
            width, height, mode = probe(path)
    except BadImage as exc:
        raise BadInput(f"{exc}; is it a PNG, JPEG or TIFF image?") from None
    if width < tiling.tile or height < tiling.tile:
        raise BadInput(
            f"image {path} is {width}x{height}, smaller than the tile the run was trained on "
            f"({tiling.tile} px); use an image at least that large"
        )
    if mode != tiling.mode:
        raise BadInput(
            f"image {path} is {_MODES[mode]} but the run's model takes {_MODES[tiling.mode]} "
            f"images; convert it to {_MODES[tiling.mode]}"
        )
    nx, ny = (
        positions(width, tiling.tile, tiling.stride),
        positions(height, tiling.tile, tiling.stride),
    )
    return Probed(path, width, height, nx, ny)


def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """Indices into a side of `size` pixels padded by reflection, as np.pad(mode="reflect")
    (the margin is always smaller than the side, which is at least a tile)."""
    index = np.abs(index)
    return np.where(index >= size, 2 * (size - 1) - index, index)


def _band(image: Image.Image, top: int, tiling: Tiling) -> np.ndarray:
    """Rows top .. top + context of the image padded by the margin on every side, uint8 HxWxC."""
    margin, (width, height) = tiling.margin, image.size
    rows = _reflect(np.arange(top - margin, top - margin + tiling.context), height)
    low, high = int(rows.min()), int(rows.max()) + 1
    strip = as_uint8(image.crop((0, low, width, high)), tiling.mode)
    strip = strip[rows - low] if strip.ndim == 3 else strip[rows - low, :, None]
    return np.pad(strip, [(0, 0), (margin, margin), (0, 0)], mode="reflect")


def bands(probed: Probed, tiling: Tiling, angles: Sequence[int]) -> Iterator[np.ndarray]:
    """Each row of tile positions, top to bottom: its fragments (uint8 N x tile x tile x C),
    position by position from the left and every angle at each position, the order of the
    manifest's fragment ids. Raises BadInput for an image that does not decode."""
    try:
        with _allow_large():
            image = Image.open(probed.path)
    except DECODE_ERRORS as exc:
        raise BadInput(f"cannot read image {probed.path}: {exc}") from None
    with image:
        try:
            image.load()
        except DECODE_ERRORS as exc:
            raise BadInput(
                f"cannot decode image {probed.path} (truncated or corrupt?): {exc}"
            ) from None
        for row in range(probed.ny):
            band = _band(image, row * tiling.stride, tiling)
            yield np.stack(
                [
                    rotate_crop(band[:, x : x + tiling.context], angle, tiling.tile)
                    for x in range(0, probed.nx * tiling.stride, tiling.stride)
                    for angle in angles
                ]
            )
