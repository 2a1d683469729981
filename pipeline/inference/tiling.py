"""Cutting an image file into the fragments a run's model was trained on, a band of tile rows at
a time.

Training fragments are cut from the source image padded by reflection (`prepare` pads it by the
manifest's margin), at positions a stride apart, by rotating each position's context and cropping
the centred tile (node_payload.fragments.rotate_crop). This cuts the same fragments straight from
an image file: the same decoding rules (pipeline.dataset_prepare: 16-bit scaled by 1/257, grey or
RGB), the same padding, positions and rotation; unrotated fragments are cut from a band in one
strided copy instead of one call each.

Only one band, the rows under one row of tile positions, is ever a numpy array, and never a float
one. A TIFF is read strip by strip (or tile row by tile row): each band decodes only the strips
under it that the previous band did not, so a slide of any size takes memory for a few strips.
Other formats (PNG, JPEG) have no such index: PIL decodes them whole, at their stored depth.
"""

import io
import math
import os
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, TiffImagePlugin, TiffTags

from node_payload.common.errors import UserError
from node_payload.common.manifest import Manifest, positions
from node_payload.fragments import rotate_crop
from pipeline.dataset_prepare import DECODE_ERRORS, BadImage, as_uint8, probe

# PIL refuses images over 179 Mpx as decompression bombs; a 20,000 x 20,000 slide is 400 Mpx.
# Memory here grows with the stored pixels (the bands are bounded), so the limit is raised to
# 2**30 px (32,768 x 32,768): 1 GiB in 8-bit grey.
MAX_PIXELS = 2**30
_MODES = {"L": "greyscale", "RGB": "colour (RGB)"}


class BadInput(UserError):
    """An image that cannot be classified; the message names the file and why (the other
    images go on)."""


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


class _Rows(Protocol):
    def rows(self, low: int, high: int) -> np.ndarray:
        """Image rows low .. high (uint8 HxWxC); each call's rows are at or below the last's."""
        ...


def _three_d(pixels: np.ndarray) -> np.ndarray:
    return pixels if pixels.ndim == 3 else pixels[:, :, None]


class _Whole:
    """An image PIL decodes whole (PNG, JPEG, a TIFF whose layout is not read here), kept at its
    stored depth; a band is converted to uint8 when asked for."""

    def __init__(self, image: Image.Image, mode: str) -> None:
        self.image, self.mode = image, mode

    def rows(self, low: int, high: int) -> np.ndarray:
        width = self.image.size[0]
        return _three_d(as_uint8(self.image.crop((0, low, width, high)), self.mode))


# How a TIFF stores its pixels: the tags a band's strips are decoded with (the others, metadata
# and offsets to other directories, are left out).
_STRUCTURE_TAGS = (256, 258, 259, 262, 266, 277, 278, 284, 317, 320, 322, 323, 338, 339, 347)
_STRUCTURE_TAGS += (529, 530, 531, 532)  # YCbCr coefficients, subsampling, positioning, range
_STRIP_OFFSETS, _STRIP_COUNTS, _TILE_OFFSETS, _TILE_COUNTS = 273, 279, 324, 325
# Compressions whose strips and tiles decode independently of each other: none, LZW, JPEG,
# deflate (two codes), PackBits. Others (old-style JPEG points into the file) are decoded whole.
_SEGMENTED = {1, 5, 7, 8, 32946, 32773}
_CLASSIC = {TiffTags.LONG8: TiffTags.LONG}  # BigTIFF offsets, rewritten into a classic TIFF


@dataclass(frozen=True)
class _Layout:
    """Where the strips or tiles of a TIFF's first image are, and how they cover it."""

    offsets: tuple[int, ...]
    counts: tuple[int, ...]
    tiled: bool
    height: int  # rows of pixels in one strip or tile
    across: int  # tiles in a row of tiles (1 for strips)
    down: int  # rows of strips or tiles in one plane
    planes: int  # planes stored apart (planar configuration 2), else 1
    row_bytes: int  # uncompressed strips: the bytes of one row of one plane, read alone; else 0


def _layout(image: Image.Image) -> _Layout | None:
    """The TIFF's strip or tile table, if its strips can be decoded apart; else None."""
    if not isinstance(image, TiffImagePlugin.TiffImageFile):
        return None
    tags, (width, height) = image.tag_v2, image.size
    tiled = _TILE_OFFSETS in tags
    offsets, counts = (
        tags.get(_TILE_OFFSETS if tiled else _STRIP_OFFSETS),
        tags.get(_TILE_COUNTS if tiled else _STRIP_COUNTS),
    )
    compression, planar = tags.get(259, 1), tags.get(284, 1)
    if compression not in _SEGMENTED or planar not in (1, 2) or not offsets or not counts:
        return None
    samples = tags.get(277, 1)
    planes = samples if planar == 2 else 1
    if tiled:
        tile_width, segment = tags.get(322, 0), tags.get(323, 0)
        if not isinstance(tile_width, int) or tile_width < 1:
            return None
        across = math.ceil(width / tile_width)
    else:
        across, segment = 1, tags.get(278, height)
    if not isinstance(segment, int) or segment < 1:
        return None
    segment = min(segment, height)  # 2**32 - 1 says one strip
    down = math.ceil(height / segment)
    if len(offsets) != len(counts) or len(offsets) != across * down * planes:
        return None
    bits = tags.get(258, 1)
    bits = bits[0] if isinstance(bits, tuple) else bits
    row_bytes = 0
    if compression == 1 and not tiled:
        row_bytes = math.ceil(width * (samples // planes) * bits / 8)
    return _Layout(tuple(offsets), tuple(counts), tiled, segment, across, down, planes, row_bytes)


class _Strips:
    """A TIFF's rows, decoded strip by strip as the bands move down: each strip (or row of
    tiles) is read and decoded once, into a small TIFF of its own that PIL decodes with the
    file's own structure tags, so its pixels are the ones a whole decode gives. Only the rows
    from the current band's top to the end of the last strip decoded are held. An uncompressed
    strip is read row by row."""

    def __init__(
        self, path: Path, image: TiffImagePlugin.TiffImageFile, layout: _Layout, mode: str
    ) -> None:
        self.path, self.layout, self.mode, self.stored_mode = path, layout, mode, image.mode
        self.width, self.height = image.size
        self.prefix = image.tag_v2.prefix
        self.tags = {
            tag: (_CLASSIC.get(image.tag_v2.tagtype[tag], image.tag_v2.tagtype[tag]), value)
            for tag in _STRUCTURE_TAGS
            if (value := image.tag_v2.get(tag)) is not None
        }
        self.file = path.open("rb")
        self.size = os.fstat(self.file.fileno()).st_size
        self.top = 0  # the first row of `held`
        self.held = np.zeros((0, self.width, 0), np.uint8)

    def close(self) -> None:
        self.file.close()

    def rows(self, low: int, high: int) -> np.ndarray:
        end = self.top + len(self.held)
        if high > end:
            first, fresh = self._decode(max(low, end), high)
            if first == end and low < end:
                fresh = np.concatenate([self.held[low - self.top :], fresh])
                first = low
            self.top, self.held = first, fresh
        elif low > self.top:
            self.top, self.held = low, self.held[low - self.top :]
        return self.held[low - self.top : high - self.top]

    def _read(self, index: int, skip: int, length: int) -> bytes:
        """`length` bytes from `skip` into strip (or tile) `index`, checked against the file."""
        kind = "tile" if self.layout.tiled else "strip"
        offset, count = self.layout.offsets[index], self.layout.counts[index]
        if skip + length > count or offset + count > self.size:
            raise BadInput(
                f"cannot decode image {self.path}: its {kind} {index} (bytes {offset} to "
                f"{offset + count}) lies past the end of the file ({self.size} bytes) or is "
                "shorter than its rows; the file is truncated or corrupt: copy or export it again"
            )
        data = os.pread(self.file.fileno(), length, offset + skip)
        if len(data) != length:
            raise BadInput(f"cannot decode image {self.path}: the file shrank while being read")
        return data

    def _segments(self, low: int, high: int) -> tuple[int, int, list[bytes]]:
        """The first row, row count and stored bytes (plane by plane) covering rows low..high."""
        layout = self.layout
        if layout.row_bytes:  # uncompressed strips: exactly the rows asked for
            planes = []
            for plane in range(layout.planes):
                parts, row = [], low
                while row < high:
                    strip = row // layout.height
                    stop = min(high, (strip + 1) * layout.height)
                    index = plane * layout.down + strip
                    skip = (row - strip * layout.height) * layout.row_bytes
                    parts.append(self._read(index, skip, (stop - row) * layout.row_bytes))
                    row = stop
                planes.append(b"".join(parts))
            return low, high - low, planes
        first, last = low // layout.height, (high - 1) // layout.height + 1
        per_plane = layout.across * layout.down
        segments = [
            self._read(index, 0, layout.counts[index])
            for plane in range(layout.planes)
            for row in range(first, last)
            for index in range(
                plane * per_plane + row * layout.across,
                plane * per_plane + (row + 1) * layout.across,
            )
        ]
        top = first * layout.height
        return top, min(last * layout.height, self.height) - top, segments

    def _tiff(self, rows: int, segments: list[bytes]) -> bytes:
        """A TIFF of `rows` rows holding `segments`, with the file's structure tags."""
        ifd = TiffImagePlugin.ImageFileDirectory_v2(prefix=self.prefix)
        for tag, (kind, value) in self.tags.items():
            ifd.tagtype[tag] = kind
            ifd[tag] = value
        offsets_tag, counts_tag = (
            (_TILE_OFFSETS, _TILE_COUNTS) if self.layout.tiled else (_STRIP_OFFSETS, _STRIP_COUNTS)
        )
        for tag in (257, offsets_tag, counts_tag) + ((278,) if self.layout.row_bytes else ()):
            ifd.tagtype[tag] = TiffTags.LONG
        ifd[257] = rows
        if self.layout.row_bytes:
            ifd[278] = rows
        ifd[counts_tag] = tuple(map(len, segments))
        starts = tuple(int(s) for s in np.cumsum([0, *map(len, segments[:-1])]))
        # PIL moves strip offsets past the directory it writes; tile offsets are written as given
        ifd[offsets_tag] = starts
        if self.layout.tiled:
            after = 8 + len(ifd.tobytes(8))
            ifd[offsets_tag] = tuple(after + start for start in starts)
        endian = "<" if self.prefix == b"II" else ">"
        header = self.prefix + struct.pack(f"{endian}HL", 42, 8)
        return header + ifd.tobytes(8) + b"".join(segments)

    def _decode(self, low: int, high: int) -> tuple[int, np.ndarray]:
        top, rows, segments = self._segments(low, high)
        try:
            with _allow_large(), Image.open(io.BytesIO(self._tiff(rows, segments))) as part:
                part.load()
                if part.size != (self.width, rows) or part.mode != self.stored_mode:
                    raise ValueError(f"strips decode as {part.mode} {part.size}")
                pixels = _three_d(as_uint8(part, self.mode))
        except DECODE_ERRORS as exc:
            raise BadInput(
                f"cannot decode image {self.path} (truncated or corrupt?): {exc}"
            ) from None
        return top, pixels


@contextmanager
def _open(path: Path, mode: str) -> Iterator[_Rows]:
    """The image's rows: a TIFF's strip by strip, any other image's from one whole decode."""
    try:
        with _allow_large():
            image = Image.open(path)
    except DECODE_ERRORS as exc:
        raise BadInput(f"cannot read image {path}: {exc}") from None
    with image:
        layout = _layout(image)
        if layout is not None:
            strips = _Strips(path, image, layout, mode)
            try:
                yield strips
            finally:
                strips.close()
            return
        try:
            image.load()
        except DECODE_ERRORS as exc:
            raise BadInput(f"cannot decode image {path} (truncated or corrupt?): {exc}") from None
        yield _Whole(image, mode)


def _band(source: _Rows, top: int, tiling: Tiling, height: int) -> np.ndarray:
    """Rows top .. top + context of the image padded by the margin on every side, uint8 HxWxC."""
    margin = tiling.margin
    rows = _reflect(np.arange(top - margin, top - margin + tiling.context), height)
    low, high = int(rows.min()), int(rows.max()) + 1
    strip = source.rows(low, high)[rows - low]
    return np.pad(strip, [(0, 0), (margin, margin), (0, 0)], mode="reflect")


def _cut(band: np.ndarray, nx: int, tiling: Tiling, angles: Sequence[int]) -> np.ndarray:
    """The band's fragments, position by position and every angle at each position. Unrotated,
    rotate_crop crops the context's centre: all positions are one strided view, copied once."""
    tile, margin, stride = tiling.tile, tiling.margin, tiling.stride
    if all(angle % 360 == 0 for angle in angles):
        windows = sliding_window_view(band[margin : margin + tile, margin:], tile, axis=1)
        fragments = np.ascontiguousarray(
            windows[:, : (nx - 1) * stride + 1 : stride].transpose(1, 0, 3, 2)
        )
        return np.repeat(fragments, len(angles), axis=0) if len(angles) > 1 else fragments
    return np.stack(
        [
            rotate_crop(band[:, x : x + tiling.context], angle, tile)
            for x in range(0, nx * stride, stride)
            for angle in angles
        ]
    )


def bands(probed: Probed, tiling: Tiling, angles: Sequence[int]) -> Iterator[np.ndarray]:
    """Each row of tile positions, top to bottom: its fragments (uint8 N x tile x tile x C),
    position by position from the left and every angle at each position, the order of the
    manifest's fragment ids. Raises BadInput for an image that does not decode."""
    with _open(probed.path, tiling.mode) as source:
        for row in range(probed.ny):
            band = _band(source, row * tiling.stride, tiling, probed.height)
            yield _cut(band, probed.nx, tiling, angles)
