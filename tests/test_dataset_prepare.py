import hashlib
import itertools
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from node_payload.errors import UserError
from node_payload.fragments import decode
from node_payload.manifest import Manifest
from pipeline import dataset_prepare
from pipeline.dataset_prepare import prepare


def write_image(path: Path, size=(96, 96), mode="RGB", seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


@pytest.fixture
def src(tmp_path) -> Path:
    """Three classes of four 96x96 RGB images."""
    root = tmp_path / "src"
    for c, name in enumerate(["beta", "alpha", "gamma"]):
        for i in range(4):
            write_image(root / name / f"img{i}.png", seed=10 * c + i)
    return root


def run(src: Path, out: Path, **kwargs) -> Manifest:
    params = {"tile": 32, "overlap": 0.5, "holdout": 0.25, "seed": 3, "progress": False}
    return prepare(src, out, **(params | kwargs))


def test_counts_positions_and_round_trip(src, tmp_path):
    manifest = run(src, tmp_path / "out")
    assert manifest.classes == ["alpha", "beta", "gamma"]
    assert manifest.mode == "RGB" and manifest.tile == 32
    assert [s.path for s in manifest.sources[:2]] == ["alpha/img0.png", "alpha/img1.png"]
    # stride 16: x, y in 0, 16, ..., 64 -> 5 x 5 fragments per image
    assert len(manifest.fragments) == 12 * 25
    assert all(len(ids) == 25 for ids in manifest.by_source().values())
    first = [(f.x, f.y) for f in manifest.fragments[:6]]
    assert first == [(0, 0), (16, 0), (32, 0), (48, 0), (64, 0), (0, 16)]
    for label in range(3):
        held = [s for s in manifest.sources if s.label == label and s.holdout]
        assert len(held) == 1  # round(0.25 * 4)
    loaded = Manifest.load(tmp_path / "out" / "manifest.json")
    assert loaded.digest() == manifest.digest()
    assert loaded.fragments == manifest.fragments
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp dir left


def test_files_lists_every_shard_with_its_size_and_hash(src, tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_prepare, "SHARD_BYTES", 40_000)
    manifest = run(src, tmp_path / "out")
    files = manifest.files()
    assert len(files) > 1 and [f.path for f in files] == manifest.shards
    for f in files:
        data = (tmp_path / "out" / f.path).read_bytes()
        assert (f.bytes, f.sha256) == (len(data), hashlib.sha256(data).hexdigest())


def test_every_fragment_is_the_exact_crop_with_its_checksum(src, tmp_path):
    manifest = run(src, tmp_path / "out")
    shards = {s: (tmp_path / "out" / s).read_bytes() for s in manifest.shards}
    originals = {s.path: np.asarray(Image.open(src / s.path)) for s in manifest.sources}
    for f in manifest.fragments:
        data = shards[f.shard][f.offset : f.offset + f.length]
        assert hashlib.sha256(data).hexdigest() == f.sha256
        crop = originals[manifest.sources[f.source].path][f.y : f.y + 32, f.x : f.x + 32]
        np.testing.assert_array_equal(decode(data, "RGB"), crop)


def test_stride_formula_on_a_non_square_image(tmp_path):
    for name in ("a", "b"):
        for i in range(3):
            write_image(tmp_path / "src" / name / f"{i}.jpg", size=(100, 70), seed=i)
    manifest = run(tmp_path / "src", tmp_path / "out", overlap=0.25, holdout=0.0)
    # stride round(32 * 0.75) = 24: nx = (100 - 32) // 24 + 1 = 3, ny = (70 - 32) // 24 + 1 = 2
    assert {(f.x, f.y) for f in manifest.fragments} == {
        (x, y) for x in (0, 24, 48) for y in (0, 24)
    }
    assert len(manifest.fragments) == 6 * 6
    assert not any(s.holdout for s in manifest.sources)


def test_sources_never_span_shards(src, tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_prepare, "SHARD_BYTES", 3 * 25 * 3500)
    manifest = run(src, tmp_path / "out")
    assert len(manifest.shards) > 2
    for ids in manifest.by_source().values():
        fragments = [manifest.fragments[i] for i in ids]
        assert len({f.shard for f in fragments}) == 1
        assert ids == list(range(ids[0], ids[0] + len(ids)))
        assert all(a.offset + a.length == b.offset for a, b in itertools.pairwise(fragments))


def test_prepare_is_idempotent(src, tmp_path):
    first = run(src, tmp_path / "out")
    stamp = (tmp_path / "out" / "manifest.json").stat().st_mtime_ns
    again = run(src, tmp_path / "out")
    assert again.digest() == first.digest()
    assert (tmp_path / "out" / "manifest.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("change", ["tile", "image"])
def test_a_different_dataset_in_out_dir_is_refused(src, tmp_path, change):
    first = run(src, tmp_path / "out")
    kwargs = {}
    if change == "tile":
        kwargs["tile"] = 48
    else:
        write_image(src / "alpha" / "img0.png", seed=99)
    with pytest.raises(UserError, match="already holds"):
        run(src, tmp_path / "out", **kwargs)
    assert Manifest.load(tmp_path / "out" / "manifest.json").digest() == first.digest()


def test_out_dir_with_other_files_is_refused_but_an_empty_one_is_used(src, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already holds other files"):
        run(src, tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    assert len(run(src, tmp_path / "empty").fragments) == 300


def test_corrupt_image_is_named_or_skipped(src, tmp_path, caplog):
    bad = src / "beta" / "img2.png"
    bad.write_bytes(bad.read_bytes()[:3000])  # header intact, pixel data truncated
    with pytest.raises(UserError, match=r"beta/img2\.png"):
        run(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    with caplog.at_level(logging.WARNING):
        manifest = run(src, tmp_path / "out", on_bad_image="skip")
    assert "beta/img2.png" in caplog.text
    assert "beta/img2.png" not in [s.path for s in manifest.sources]
    assert len(manifest.sources) == 11 and len(manifest.fragments) == 11 * 25


def test_unreadable_file_is_named(src, tmp_path):
    (src / "gamma" / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(UserError, match=r"gamma/junk\.jpg"):
        run(src, tmp_path / "out")


def test_image_smaller_than_the_tile(src, tmp_path):
    write_image(src / "alpha" / "small.png", size=(96, 20))
    with pytest.raises(UserError, match=r"alpha/small\.png is 96x20, smaller than the tile"):
        run(src, tmp_path / "out")


def test_mixed_modes_name_an_example_of_each(src, tmp_path):
    write_image(src / "gamma" / "grey.png", mode="L")
    with pytest.raises(UserError, match="mixed greyscale and colour") as error:
        run(src, tmp_path / "out")
    assert "gamma/grey.png" in str(error.value) and "alpha/img0.png" in str(error.value)


def test_sixteen_bit_grey_is_scaled(tmp_path):
    values = np.arange(96 * 96, dtype=np.uint16).reshape(96, 96) * 7
    for name in ("a", "b"):
        for i in range(2):
            path = tmp_path / "src" / name / f"{i}.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(values).save(path)
    manifest = run(tmp_path / "src", tmp_path / "out", holdout=0.0)
    assert manifest.mode == "L"
    f = manifest.fragments[7]
    data = (tmp_path / "out" / f.shard).read_bytes()[f.offset : f.offset + f.length]
    expected = (values[f.y : f.y + 32, f.x : f.x + 32].astype(int) + 128) // 257
    np.testing.assert_array_equal(decode(data, "L")[:, :, 0], expected)


def test_folder_structure_errors(tmp_path, src):
    (tmp_path / "flat").mkdir()
    write_image(tmp_path / "flat" / "a.png")
    with pytest.raises(UserError, match="no class folders"):
        run(tmp_path / "flat", tmp_path / "out")
    (src / "delta").mkdir()
    (src / "delta" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match=r"delta holds no PNG"):
        run(src, tmp_path / "out")


def test_holdout_must_leave_two_sources(src, tmp_path):
    with pytest.raises(UserError, match=r"class 'alpha' has 4 source images; holdout 0\.7 keeps 3"):
        run(src, tmp_path / "out", holdout=0.7)


def test_manifest_rejects_a_tampered_shard_path(src, tmp_path):
    run(src, tmp_path / "out")
    path = tmp_path / "out" / "manifest.json"
    path.write_text(path.read_text().replace('"shards/s00000.bin"', '"../s00000.bin"'))
    with pytest.raises(UserError, match=r"'\.\./s00000\.bin'"):
        Manifest.load(path)
