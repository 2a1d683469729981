import numpy as np
import pytest
import torch

from node_payload.batches import to_tensor
from node_payload.common.manifest import margin_for
from node_payload.fragments import rotate_crop


@pytest.mark.parametrize("tile", [32, 64, 256])
@pytest.mark.parametrize("angle", range(0, 360, 5))
def test_rotation_leaves_no_empty_corner(tile, angle):
    side = tile + 2 * margin_for(tile)
    context = np.full((side, side, 3), 200, dtype=np.uint8)
    out = rotate_crop(context, angle, tile)
    assert out.shape == (tile, tile, 3)
    assert out.min() == 200 == out.max()


def test_to_tensor_s_lookup_gives_the_floats_of_x_over_127_5_minus_1():
    # every pixel value, in a batch large enough for torch's vectorised kernels
    images = np.resize(np.arange(256, dtype=np.uint8), (8, 32, 32, 3))
    expected = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    x = to_tensor(images, 32)
    assert torch.equal(x, expected) and x.stride() == expected.stride()
    with pytest.raises(TypeError, match="uint8"):
        to_tensor(images.astype(np.float32), 32)
