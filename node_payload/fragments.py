"""Turning stored blocks into fragments, kept apart from fetching so it can be tested offline."""

import io

import numpy as np
from PIL import Image

from node_payload.common.manifest import Fragment, Manifest


def decode(data: bytes, mode: str) -> np.ndarray:
    """Encoded block -> writable uint8 array HxWxC (C=1 for "L", 3 for "RGB").

    Raises ValueError for bytes that are not an image of the manifest's mode, so a corrupt
    block that slipped past the checksum cannot silently train on garbage.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode != mode:
                raise ValueError(f"block has mode {image.mode!r}, expected {mode!r}")
            array = np.array(image, dtype=np.uint8)
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"corrupt block: {exc}") from exc
    return array[:, :, None] if array.ndim == 2 else array


def rotate_crop(context: np.ndarray, angle: int, tile: int) -> np.ndarray:
    """Rotate the square context (HxWxC) counter-clockwise about its centre, bilinear, and crop
    the centred tile. The context is at least tile * sqrt(2) + 2 wide, so no corner is empty."""
    margin = (context.shape[0] - tile) // 2
    if angle % 360:
        channels = [
            np.asarray(Image.fromarray(context[:, :, c]).rotate(angle, Image.Resampling.BILINEAR))
            for c in range(context.shape[2])
        ]
        context = np.stack(channels, axis=2)
    return np.ascontiguousarray(context[margin : margin + tile, margin : margin + tile])


def cut(manifest: Manifest, fragment: Fragment, blocks: dict[int, np.ndarray]) -> np.ndarray:
    """The fragment's pixels (tile x tile x C) from its decoded blocks (by block id)."""
    needed, (ox, oy) = manifest.blocks(fragment)
    ids = [b.id for b in needed]
    width = (ox + manifest.context - 1) // manifest.block + 1  # blocks per row of the context
    rows = [
        np.concatenate([blocks[i] for i in ids[r : r + width]], axis=1)
        for r in range(0, len(ids), width)
    ]
    mosaic = np.concatenate(rows, axis=0)
    context = mosaic[oy : oy + manifest.context, ox : ox + manifest.context]
    return rotate_crop(context, fragment.angle, manifest.tile)
