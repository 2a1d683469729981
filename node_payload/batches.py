"""Turning decoded fragments into training batches, identically on nodes and in evaluation."""

import numpy as np
import torch
import torch.nn.functional as F

# The model input of each pixel value, computed once by the float ops that map 0..255 to [-1, 1]
# (x / 127.5 - 1): a table lookup gives the same floats in one numpy pass, without torch's
# threads, whose three passes took up to 20x longer whenever another process shared the cores.
_LEVELS = torch.arange(256, dtype=torch.float32).div_(127.5).sub_(1.0).numpy()


def to_tensor(images: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 NHWC fragments -> float NCHW in [-1, 1] (channels stored last, as the permute of
    the NHWC pixels), resized when the tile differs from the model."""
    if images.dtype != np.uint8:
        raise TypeError(f"fragments must be uint8, not {images.dtype}")
    x = torch.from_numpy(np.take(_LEVELS, images)).permute(0, 3, 1, 2)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True)
    return x


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random right-angle rotations and flips: microscopy fragments have no fixed orientation."""
    quarter_turns = int(torch.randint(4, (1,), generator=generator))
    x = torch.rot90(x, quarter_turns, dims=(2, 3))
    if bool(torch.randint(2, (1,), generator=generator)):
        x = torch.flip(x, dims=(3,))
    return x
