import numpy as np
import pytest
from PIL import Image

from node_payload.common.errors import UserError
from pipeline.textures import FAMILIES, generate


def test_writes_an_image_folder_tree(tmp_path):
    out = generate(tmp_path / "tex", classes=3, images_per_class=2, size=64, progress=False)
    assert out == tmp_path / "tex"
    assert sorted(p.name for p in out.iterdir()) == sorted(FAMILIES)[:3]
    for path in out.glob("*/*.png"):
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.size == (64, 64)
    assert len(list(out.glob("*/*.png"))) == 6


def test_deterministic_from_the_seed_and_varied_between_images(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        generate(tmp_path / name, classes=2, images_per_class=2, size=48, seed=seed, progress=False)
    same = [(tmp_path / d / "cells" / "0.png").read_bytes() for d in ("a", "b", "c")]
    assert same[0] == same[1] != same[2]
    assert same[0] != (tmp_path / "a" / "cells" / "1.png").read_bytes()


def test_mean_colour_does_not_separate_the_classes(tmp_path):
    generate(tmp_path, classes=6, images_per_class=4, size=256, progress=False)
    means, labels = [], []
    for label, name in enumerate(FAMILIES):
        for i in range(4):
            pixels = np.asarray(Image.open(tmp_path / name / f"{i}.png"), dtype=np.float32)
            tiles = pixels.reshape(4, 64, 4, 64, 3).mean(axis=(1, 3)).reshape(-1, 3)
            means += list(tiles)
            labels += [label] * len(tiles)
    means, labels = np.array(means), np.array(labels)
    centroids = np.stack([means[labels == c].mean(axis=0) for c in range(6)])
    nearest = np.argmin(((means[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == labels).mean() < 0.4  # chance is 1/6


@pytest.mark.parametrize("kwargs", [{"classes": 1}, {"classes": 7}, {"images_per_class": 0}])
def test_invalid_parameters(tmp_path, kwargs):
    with pytest.raises(UserError):
        generate(tmp_path, progress=False, **kwargs)
