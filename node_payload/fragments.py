"""Decoding of fragment bytes, kept apart from fetching so training can be tested offline."""

import io

import numpy as np
from PIL import Image


def decode(data: bytes, mode: str) -> np.ndarray:
    """Encoded fragment -> writable uint8 array HxWxC (C=1 for "L", 3 for "RGB").

    Raises ValueError for bytes that are not an image of the manifest's mode, so a corrupt
    fragment that slipped past the checksum cannot silently train on garbage.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode != mode:
                raise ValueError(f"fragment has mode {image.mode!r}, expected {mode!r}")
            array = np.array(image, dtype=np.uint8)
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"corrupt fragment: {exc}") from exc
    return array[:, :, None] if array.ndim == 2 else array
