import numpy as np
import pytest

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
