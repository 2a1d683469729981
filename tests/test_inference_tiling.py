"""predict cuts an image file into exactly the fragments training cut from the dataset, one band
of tile rows at a time, with prepare's rules for grey, colour and 16-bit images."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from node_payload.common.manifest import Manifest
from pipeline import baseline
from pipeline.dataset_prepare import prepare
from pipeline.inference import tiling
from pipeline.inference.tiling import BadInput, Tiling, bands, check


@pytest.fixture(scope="module")
def lossless(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny textures prepared as PNG blocks, at 4 angles, with an odd stride."""
    out = tmp_path_factory.mktemp("lossless") / "prepared"
    prepare(
        tiny_source,
        out,
        tile=24,
        overlap=0.4,
        holdout=0.25,
        progress=False,
        lossless=True,
        angles="0:360:30",
    )
    return out


def test_fragments_equal_the_training_fragments_of_every_source(
    tiny_source: Path, lossless: Path
) -> None:
    manifest = Manifest.load(lossless / "manifest.json")
    for index, source in enumerate(manifest.sources):
        ids = list(manifest.by_source()[index])
        trained = baseline.read_fragments(manifest, lossless, ids).images
        probed = check(tiny_source / source.path, Tiling.of(manifest))
        cut = np.concatenate(list(bands(probed, Tiling.of(manifest), manifest.angles)))
        assert (probed.nx, probed.ny) == (source.nx, source.ny)
        np.testing.assert_array_equal(cut, trained)


def _tiling(mode: str = "L") -> Tiling:
    manifest_like = {"tile": 32, "stride": 16, "margin": 9}
    return Tiling(**manifest_like, mode=mode)


def test_a_large_image_is_streamed_band_by_band_never_converted_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "slide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1500, 1200), np.uint8)).save(path)
    converted: list[tuple[int, ...]] = []

    def recording(image: Image.Image, mode: str) -> np.ndarray:
        array = tiling_as_uint8(image, mode)
        converted.append(array.shape)
        return array

    tiling_as_uint8 = tiling.as_uint8
    monkeypatch.setattr(tiling, "as_uint8", recording)
    probed = check(path, _tiling())
    rows = list(bands(probed, _tiling(), [0]))
    assert len(rows) == probed.ny == (1500 - 32) // 16 + 1
    assert all(len(row) == probed.nx for row in rows)
    # every array made from the image is one band: the rows under one row of tiles (+ margins)
    assert len(converted) == probed.ny
    assert max(shape[0] for shape in converted) <= _tiling().context
    assert all(row.dtype == np.uint8 for row in rows)


def test_16_bit_grey_is_scaled_by_1_257_as_prepare_scales_it(tmp_path: Path) -> None:
    wide = np.random.default_rng(1).integers(0, 65536, (64, 80), dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    Image.fromarray(((wide.astype(np.int64) + 128) // 257).astype(np.uint8)).save(
        tmp_path / "narrow.png"
    )
    assert Image.open(tmp_path / "wide.tif").mode.startswith("I;16")
    cut = [
        np.concatenate(list(bands(check(tmp_path / name, _tiling()), _tiling(), [0, 90])))
        for name in ("wide.tif", "narrow.png")
    ]
    np.testing.assert_array_equal(*cut)
    assert cut[0].shape == (4 * 3 * 2, 32, 32, 1)


def test_palette_and_alpha_images_are_colour_as_prepare_decides(tmp_path: Path) -> None:
    rgb = np.random.default_rng(2).integers(0, 256, (40, 40, 3), np.uint8)
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "alpha.png")
    cut = np.concatenate(
        list(bands(check(tmp_path / "alpha.png", _tiling("RGB")), _tiling("RGB"), [0]))
    )
    np.testing.assert_array_equal(cut[0], rgb[:32, :32])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda p: Image.new("L", (20, 64)).save(p),
            "is 20x64, smaller than the tile the run was trained on (32 px)",
        ),
        (
            lambda p: Image.new("RGB", (64, 64)).save(p),
            "is colour (RGB) but the run's model takes greyscale images",
        ),
        (lambda p: p.write_bytes(b"not an image at all"), "cannot read image"),
        (lambda p: None, "no such image file"),
    ],
)
def test_an_image_the_model_cannot_take_is_refused_naming_the_file(
    tmp_path: Path, make, message: str
) -> None:
    path = tmp_path / "input.png"
    make(path)
    with pytest.raises(BadInput, match=r"input\.png") as error:
        check(path, _tiling())
    assert message in str(error.value)


def test_a_truncated_image_fails_on_decoding_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (200, 200), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    probed = check(path, _tiling())  # the header is intact
    with pytest.raises(BadInput, match=r"cannot decode image .*cut.png \(truncated or corrupt\?\)"):
        next(bands(probed, _tiling(), [0]))


def _grey(height: int = 203, width: int = 157, seed: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width), np.uint8)


def _rgb(height: int = 203, width: int = 157) -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, (height, width, 3), np.uint8)


# TIFF layouts (strip sizes that do not divide the image, tiles that overhang it) and every
# compression PIL decodes, in both byte orders and as BigTIFF
_TIFFS = {
    "uncompressed, one strip": lambda p: Image.fromarray(_grey()).save(p),
    "LZW strips": lambda p: Image.fromarray(_grey()).save(
        p, compression="tiff_lzw", strip_size=900
    ),
    "deflate strips, colour": lambda p: Image.fromarray(_rgb()).save(
        p, compression="tiff_adobe_deflate", strip_size=2000
    ),
    "PackBits strips": lambda p: Image.fromarray(_grey()).save(
        p, compression="packbits", strip_size=900
    ),
    "JPEG strips, colour": lambda p: Image.fromarray(_rgb()).save(
        p, compression="jpeg", strip_size=2000
    ),
    "uncompressed strips, big-endian 16-bit": lambda p: tifffile.imwrite(
        p, _grey().astype(np.uint16) * 257 + 3, rowsperstrip=7, byteorder=">"
    ),
    "uncompressed tiles": lambda p: tifffile.imwrite(p, _grey(), tile=(32, 48)),
    "deflate tiles, colour, BigTIFF": lambda p: tifffile.imwrite(
        p, _rgb(), tile=(32, 48), compression="zlib", bigtiff=True
    ),
    "deflate strips, colour planes apart": lambda p: tifffile.imwrite(
        p,
        _rgb().transpose(2, 0, 1),
        rowsperstrip=9,
        compression="zlib",
        planarconfig="separate",
        photometric="rgb",
    ),
}


@pytest.mark.parametrize("layout", list(_TIFFS))
def test_a_tiff_cut_strip_by_strip_equals_its_whole_decode_bit_for_bit(
    tmp_path: Path, layout: str
) -> None:
    path = tmp_path / "slide.tif"
    _TIFFS[layout](path)
    mode = "RGB" if "colour" in layout else "L"
    with Image.open(path) as image:
        assert tiling._layout(image) is not None  # read strip by strip, not decoded whole
        image.load()
        Image.fromarray(tiling.as_uint8(image, mode)).save(tmp_path / "whole.png")
    angles = [0, 90] if "JPEG" in layout else [0]
    cut = [
        np.concatenate(list(bands(check(tmp_path / name, _tiling(mode)), _tiling(mode), angles)))
        for name in ("slide.tif", "whole.png")
    ]
    np.testing.assert_array_equal(*cut)


def _reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every (offset, length) read from an image file strip by strip."""
    reads: list[tuple[int, int]] = []

    def recording(fd: int, length: int, offset: int) -> bytes:
        reads.append((offset, length))
        return pread(fd, length, offset)

    pread = tiling.os.pread
    monkeypatch.setattr(tiling.os, "pread", recording)
    return reads


def test_each_band_decodes_only_the_strips_under_it_each_strip_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "slide.tif"
    Image.fromarray(_grey(600, 80)).save(path, compression="tiff_lzw", strip_size=400)
    with Image.open(path) as image:
        offsets = list(image.tag_v2[273])
        assert image.tag_v2[278] == 5  # rows per strip
    reads = _reads(monkeypatch)
    probed = check(path, _tiling())
    cut = bands(probed, _tiling(), [0])
    strips_read = []
    for row in range(probed.ny):
        next(cut)
        # rows under band `row`: from its top less the margin to its bottom plus the margin
        bottom = min(row * 16 - 9 + _tiling().context, 600)
        strips_read.append(len(reads))
        assert [offsets.index(offset) for offset, _ in reads] == list(range(-(-bottom // 5)))
    assert strips_read[0] == -(-(_tiling().context - 9) // 5) < len(offsets) // 10


def test_an_uncompressed_tiff_is_read_row_by_row_never_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "slide.tif"
    Image.fromarray(_grey(600, 80)).save(path)  # one strip of 600 rows
    reads = _reads(monkeypatch)
    list(bands(check(path, _tiling()), _tiling(), [0]))
    assert sum(length for _, length in reads) == 600 * 80  # every row once
    assert max(length for _, length in reads) <= _tiling().context * 80


def _strip_offsets_at(path: Path) -> int:
    """Where in the file the strip offsets table is."""
    with tifffile.TiffFile(path) as tiff:
        return tiff.pages[0].tags["StripOffsets"].valueoffset


@pytest.mark.parametrize("damage", ["offset past the end", "truncated"])
def test_a_tiff_whose_strips_lie_past_its_end_is_one_message_naming_it(
    tmp_path: Path, damage: str
) -> None:
    path = tmp_path / "broken.tif"
    tifffile.imwrite(path, _grey(300, 64), rowsperstrip=8, compression="zlib")
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) * 2 // 3]
    else:  # the 20th strip's offset, 4 bytes little-endian, moved 1 GB away
        at = _strip_offsets_at(path) + 4 * 20
        data[at : at + 4] = (2**30).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(BadInput, match=r"broken\.tif: its strip \d+ .* lies past the end"):
        list(bands(check(path, _tiling()), _tiling(), [0]))
