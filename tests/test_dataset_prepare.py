import hashlib
import itertools
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from blake3 import blake3
from PIL import Image

from node_payload.common.errors import UserError
from node_payload.common.manifest import FORMAT, HASH_HEX, Manifest
from node_payload.fragments import cut, decode
from pipeline import dataset_prepare
from pipeline.dataset_prepare import prepare
from pipeline.textures import generate


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
    return prepare(src, out, **(params | {"workers": 1} | kwargs))


def pixels(manifest: Manifest, root: Path, id_: int) -> np.ndarray:
    """A fragment as a node builds it, from the shard bytes on disk (checking block hashes)."""
    fragment = manifest.fragment(id_)
    blocks = {}
    for block in manifest.blocks(fragment)[0]:
        data = (root / block.shard).read_bytes()[block.offset : block.offset + block.length]
        assert block.matches(data)
        blocks[block.id] = decode(data, manifest.mode)
    return cut(manifest, fragment, blocks)


def test_counts_positions_and_round_trip(src, tmp_path):
    manifest = run(src, tmp_path / "out")
    assert manifest.classes == ["alpha", "beta", "gamma"]
    assert manifest.mode == "RGB" and manifest.tile == 32
    assert [s.path for s in manifest.sources[:2]] == ["alpha/img0.png", "alpha/img1.png"]
    # stride 16: x, y in 0, 16, ..., 64 -> 5 x 5 positions per image, 4 angles each
    assert manifest.angles == [0, 90, 180, 270]
    assert len(manifest) == 12 * 25 * 4
    assert all(len(ids) == 100 for ids in manifest.by_source().values())
    first = [(f.x, f.y, f.angle) for f in map(manifest.fragment, range(0, 24, 4))]
    assert first == [(0, 0, 0), (16, 0, 0), (32, 0, 0), (48, 0, 0), (64, 0, 0), (0, 16, 0)]
    for label in range(3):
        held = [s for s in manifest.sources if s.label == label and s.holdout]
        assert len(held) == 1  # round(0.25 * 4)
    loaded = Manifest.load(tmp_path / "out" / "manifest.json")
    assert loaded.digest() == manifest.digest()
    assert loaded.sources == manifest.sources
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp dir left


def test_files_lists_every_shard_with_its_size_and_hash(src, tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_prepare, "SHARD_BYTES", 40_000)
    manifest = run(src, tmp_path / "out")
    files = manifest.files()
    assert len(files) > 1 and [f.path for f in files] == manifest.shards
    for f in files:
        data = (tmp_path / "out" / f.path).read_bytes()
        assert (f.bytes, f.sha256) == (len(data), hashlib.sha256(data).hexdigest())


def test_lossless_fragments_are_the_exact_crops_even_at_the_border(src, tmp_path):
    manifest = run(src, tmp_path / "out", lossless=True)
    assert manifest.codec == "png"
    originals = {s.path: np.asarray(Image.open(src / s.path)) for s in manifest.sources}
    for id_ in range(0, len(manifest), 4):  # angle 0
        f = manifest.fragment(id_)
        crop = originals[manifest.sources[f.source].path][f.y : f.y + 32, f.x : f.x + 32]
        np.testing.assert_array_equal(pixels(manifest, tmp_path / "out", id_), crop)
    # 90 degrees counter-clockwise of a lossless context is exact too
    f = manifest.fragment(1)
    crop = originals[manifest.sources[f.source].path][f.y : f.y + 32, f.x : f.x + 32]
    np.testing.assert_array_equal(pixels(manifest, tmp_path / "out", 1), np.rot90(crop))


def test_jpeg_blocks_are_close_to_the_source(tmp_path):
    generate(tmp_path / "src", classes=2, images_per_class=3, size=200, height=150, progress=False)
    manifest = run(tmp_path / "src", tmp_path / "out")
    assert manifest.codec == "jpeg"
    f = manifest.fragment(40)
    original = np.asarray(Image.open(tmp_path / "src" / manifest.sources[f.source].path))
    crop = original[f.y : f.y + 32, f.x : f.x + 32].astype(int)
    assert np.abs(pixels(manifest, tmp_path / "out", 40).astype(int) - crop).mean() < 4


def test_stride_formula_on_a_non_square_image(tmp_path):
    for name in ("a", "b"):
        for i in range(3):
            write_image(tmp_path / "src" / name / f"{i}.jpg", size=(100, 70), seed=i)
    manifest = run(tmp_path / "src", tmp_path / "out", overlap=0.25, holdout=0.0)
    # stride round(32 * 0.75) = 24: nx = (100 - 32) // 24 + 1 = 3, ny = (70 - 32) // 24 + 1 = 2
    assert {(f.x, f.y) for f in map(manifest.fragment, range(len(manifest)))} == {
        (x, y) for x in (0, 24, 48) for y in (0, 24)
    }
    assert len(manifest) == 6 * 6 * 4
    assert not any(s.holdout for s in manifest.sources)


def test_sources_never_span_shards(src, tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_prepare, "SHARD_BYTES", 40_000)
    manifest = run(src, tmp_path / "out")
    assert len(manifest.shards) > 2
    for source in manifest.sources:
        size = (tmp_path / "out" / source.shard).stat().st_size
        assert source.offset + sum(source.lengths) <= size


def test_a_killed_prepare_resumes_with_the_encoded_sources(src, tmp_path, monkeypatch):
    calls = []
    resumed = False
    real = dataset_prepare._cut

    def dies_on_the_fifth(job):
        calls.append(job[0])
        if len(calls) == 5 and not resumed:
            raise RuntimeError("killed")
        return real(job)

    monkeypatch.setattr(dataset_prepare, "_cut", dies_on_the_fifth)
    monkeypatch.setattr(dataset_prepare, "ProcessPoolExecutor", ThreadPoolExecutor)
    with pytest.raises(RuntimeError, match="killed"):
        run(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    calls.clear()
    resumed = True
    manifest = run(src, tmp_path / "out")
    assert len(calls) <= 12 - 4 and len(manifest.sources) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_blocks_are_hashed_with_blake3_under_the_current_format(src, tmp_path):
    manifest = run(src, tmp_path / "out")
    doc = json.loads((tmp_path / "out" / "manifest.json").read_bytes())
    assert (doc["format"], doc["block_hash"]) == (FORMAT, "blake3") == (FORMAT, manifest.block_hash)
    blocks = manifest.blocks_under(range(len(manifest)))
    shards = {f: (tmp_path / "out" / f).read_bytes() for f in manifest.shards}
    for block in blocks:
        data = shards[block.shard][block.offset : block.offset + block.length]
        assert block.digest == blake3(data).hexdigest()[:HASH_HEX]


def test_a_resumed_prepare_encodes_again_what_an_older_version_hashed(src, tmp_path, monkeypatch):
    """Parts a killed run of the sha256 version left behind are not mixed into a BLAKE3 manifest."""
    real = dataset_prepare._cut

    def dies_after_four(job):
        if job[-1].name == "000004":
            raise RuntimeError("killed")
        return real(job)

    monkeypatch.setattr(dataset_prepare, "_cut", dies_after_four)
    monkeypatch.setattr(dataset_prepare, "ProcessPoolExecutor", ThreadPoolExecutor)
    with pytest.raises(RuntimeError, match="killed"):
        run(src, tmp_path / "out")
    parts = sorted((tmp_path / ".out.partial" / "parts").glob("*.json"))
    assert "000004.json" not in [part.name for part in parts]
    for part in parts[:2]:  # as the sha256 version wrote them
        meta = json.loads(part.read_text())
        data = part.with_suffix(".bin").read_bytes()
        starts = np.cumsum([0, *meta["lengths"]])
        meta["hashes"] = "".join(
            hashlib.sha256(data[a:b]).hexdigest()[:HASH_HEX] for a, b in itertools.pairwise(starts)
        )
        del meta["block_hash"]
        part.write_text(json.dumps(meta))
    encoded = []
    monkeypatch.setattr(
        dataset_prepare, "_cut", lambda job: encoded.append(job[-1].name) or real(job)
    )
    manifest = run(src, tmp_path / "out")
    left = {f"{i:06d}" for i in range(12)} - {part.stem for part in parts[2:]}
    assert sorted(encoded) == sorted(left)
    for id_ in range(0, len(manifest), 7):
        pixels(manifest, tmp_path / "out", id_)  # every block matches its hash


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
    assert len(run(src, tmp_path / "empty")) == 1200


def test_corrupt_image_is_named_or_skipped(src, tmp_path, caplog):
    bad = src / "beta" / "img2.png"
    bad.write_bytes(bad.read_bytes()[:3000])  # header intact, pixel data truncated
    with pytest.raises(UserError, match=r"beta/img2\.png") as error:
        run(src, tmp_path / "out")
    assert "dagtrain prepare --skip-bad-images" in str(error.value)
    assert "[data] skip_bad_images = true" in str(error.value)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    with caplog.at_level(logging.WARNING):
        manifest = run(src, tmp_path / "out", on_bad_image="skip")
    assert "beta/img2.png" in caplog.text
    assert "beta/img2.png" not in [s.path for s in manifest.sources]
    assert len(manifest.sources) == 11 and len(manifest) == 11 * 100


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
    manifest = run(tmp_path / "src", tmp_path / "out", holdout=0.0, lossless=True)
    assert manifest.mode == "L"
    f = manifest.fragment(28)
    expected = (values[f.y : f.y + 32, f.x : f.x + 32].astype(int) + 128) // 257
    np.testing.assert_array_equal(pixels(manifest, tmp_path / "out", 28)[:, :, 0], expected)


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
