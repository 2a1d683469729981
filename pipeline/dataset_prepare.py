"""Turn an ImageFolder tree (one subfolder per class) into a dagtrain dataset directory.

Pixels are stored once: every source image is reflection-padded by the manifest's margin (so that
tiles at the border still have a full rotation context) and cut into non-overlapping blocks,
each encoded on its own (JPEG quality 90, or PNG with `lossless`) and stored contiguously in a
shard of about 64 MB. The manifest describes fragments as an index (see node_payload.common.manifest).

Positions: stride s = max(1, round(tile * (1 - overlap))); a W x H image has
nx = (W - tile) // s + 1 by ny = (H - tile) // s + 1 tile positions at x = 0, s, 2s, ... (the
right and bottom margins smaller than a stride are dropped). Example: 2272 x 1704, tile 256,
overlap 0.5 -> s = 128, 16 x 12 = 192 positions; with angles 0:360:5 (72 angles) that is
192 * 72 = 13,824 fragments per image.

16-bit images are scaled to 8 bits over the full range (v / 257), the same for every image, so
that intensities stay comparable between images. Work goes into OUT_DIR.partial beside OUT_DIR,
one finished file per source image, so a killed run resumes where it stopped; OUT_DIR appears by
one rename at the end, so it either holds a complete dataset or nothing of this run.
"""

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from rich.progress import track

from node_payload.common import block_hash
from node_payload.common.errors import UserError
from node_payload.common.manifest import (
    FORMAT,
    HASH_HEX,
    Manifest,
    encode,
    margin_for,
    stride_for,
)
from node_payload.common.manifest_limits import MAX_BLOCK

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
SHARD_BYTES = 64 * 2**20
JPEG_QUALITY = 90
BLOCK_HASH = block_hash.BLAKE3  # what the nodes verify each fetched block with
DEFAULT_ANGLES = "0:360:90"
_GREY = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N"}
_COLOUR = {"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr"}


class BadImage(Exception):
    """An unreadable, truncated or unsupported image file (skippable with on_bad_image="skip")."""


# What PIL raises for a file that is not a readable image (truncated, corrupt, a bomb).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class _Image:
    path: Path
    rel: str
    label: int
    width: int
    height: int
    mode: str  # "L" or "RGB"


def parse_angles(text: str) -> tuple[int, int, int]:
    """ "start:stop:step" in whole degrees, stop exclusive, like Python's range: "0:360:5" -> 72."""
    try:
        start, stop, step = (int(part) for part in text.split(":"))
    except ValueError:
        raise UserError(f"angles {text!r}: expected start:stop:step in whole degrees") from None
    if not (0 <= start < stop <= 360 and step >= 1):
        raise UserError(f"angles {text!r}: need 0 <= start < stop <= 360 and step >= 1")
    return start, stop, step


def _check_parameters(tile: int, overlap: float, holdout: float, seed: int, workers: int) -> None:
    if tile < 1:
        raise UserError(f"tile must be a positive number of pixels, not {tile}")
    if not 0 <= overlap <= 0.9:
        raise UserError(f"overlap must be from 0 to 0.9, not {overlap}")
    block = block_for(stride_for(tile, overlap))
    if block > MAX_BLOCK:
        raise UserError(
            f"tile {tile} with overlap {overlap} makes blocks of {block} px, more than the "
            f"{MAX_BLOCK} px a dataset may have: lower the tile or raise the overlap"
        )
    if not 0 <= holdout < 1:
        raise UserError(f"holdout must be in [0, 1), not {holdout}")
    if seed < 0:
        raise UserError(f"seed must be non-negative, not {seed}")
    if workers < 1:
        raise UserError(f"workers must be at least 1, not {workers}")


def block_for(stride: int) -> int:
    """Block side: the smallest multiple of the stride >= 128 px, so that block boundaries fall on
    tile positions and tiny blocks do not pay a codec header each."""
    return stride * -(-128 // stride)


def images_in(folder: Path) -> list[Path]:
    """The PNG, JPEG and TIFF files under a folder (recursive, sorted, hidden ones left out)."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and p.name[0] != "."
    )


def scan(src_dir: Path) -> tuple[list[str], list[list[Path]]]:
    """Class names (sorted subfolders) and each class's image files (sorted, recursive)."""
    if not src_dir.is_dir():
        raise UserError(f"source directory {src_dir} does not exist or is not a directory")
    classes = sorted(p.name for p in src_dir.iterdir() if p.is_dir() and p.name[0] != ".")
    if not classes:
        raise UserError(f"{src_dir} has no class folders; put each class's images in a subfolder")
    files = []
    for name in classes:
        found = images_in(src_dir / name)
        if not found:
            raise UserError(f"class folder {src_dir / name} holds no PNG, JPEG or TIFF images")
        files.append(found)
    return classes, files


def _fingerprint(src_dir: Path, files: list[list[Path]], params: str) -> str:
    """Identifies the source listing (paths and contents) and the parameters, to recognise a
    re-run of prepare (finished or interrupted)."""
    digest = hashlib.sha256(params.encode())
    for path in (p for group in files for p in group):
        digest.update(path.relative_to(src_dir).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def probe(path: Path) -> tuple[int, int, str]:
    """Width, height and target mode from the header alone (cheap, to fail fast)."""
    try:
        with Image.open(path) as image:
            mode, size = image.mode, image.size
    except DECODE_ERRORS as exc:
        raise BadImage(f"cannot read image {path}: {exc}") from None
    if mode in _GREY:
        return *size, "L"
    if mode in _COLOUR:
        return *size, "RGB"
    raise BadImage(f"image {path} has unsupported pixel mode {mode!r}")


def as_uint8(image: Image.Image, mode: str) -> np.ndarray:
    """Pixels as uint8 in the dataset mode; 16-bit grey is scaled by 1/257. One rule for
    `prepare` and for `predict`, which converts a large image band by band."""
    if image.mode.startswith("I"):
        wide = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        return ((wide + 128) // 257).astype(np.uint8)
    return np.asarray(image.convert(mode))


def _decode(path: Path, mode: str) -> np.ndarray:
    """Full decode to uint8 in the dataset mode."""
    try:
        with Image.open(path) as image:
            image.load()
            return as_uint8(image, mode)
    except DECODE_ERRORS as exc:
        raise BadImage(f"cannot decode image {path} (truncated or corrupt?): {exc}") from None


def _encode(pixels: np.ndarray, lossless: bool) -> bytes:
    buffer = io.BytesIO()
    if lossless:
        Image.fromarray(pixels).save(buffer, "PNG", compress_level=6)
    else:
        Image.fromarray(pixels).save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _cut(job: tuple[Path, str, int, int, bool, Path]) -> BadImage | None:
    """Encode one source's blocks into `part` (.bin plus .json with lengths, hashes and the
    hash's name).

    A bad image is returned rather than raised, so that it does not end the ordered map.
    """
    path, mode, margin, block, lossless, part = job
    try:
        pixels = _decode(path, mode)
    except BadImage as error:
        return error
    padded = np.pad(
        pixels, [(margin, margin), (margin, margin)] + [(0, 0)] * (pixels.ndim - 2), mode="reflect"
    )
    lengths, hashes = [], []
    hex_digest = block_hash.hex_digest_function(BLOCK_HASH, "dagtrain prepare")
    tmp = part.with_suffix(".bin.tmp")
    with open(tmp, "wb") as out:
        for y in range(0, padded.shape[0], block):
            for x in range(0, padded.shape[1], block):
                data = _encode(np.ascontiguousarray(padded[y : y + block, x : x + block]), lossless)
                out.write(data)
                lengths.append(len(data))
                hashes.append(hex_digest(data)[:HASH_HEX])
    tmp.replace(part.with_suffix(".bin"))
    meta = part.with_suffix(".json.tmp")
    meta.write_text(
        json.dumps({"lengths": lengths, "hashes": "".join(hashes), "block_hash": BLOCK_HASH})
    )
    meta.replace(part.with_suffix(".json"))
    return None


def _skip_or_fail(error: BadImage, on_bad_image: str) -> None:
    if on_bad_image != "skip":
        raise UserError(
            f"{error}; fix or remove the file, or skip unreadable images: "
            "`dagtrain prepare --skip-bad-images`, or [data] skip_bad_images = true for `dagtrain plan`"
        )
    log.warning("skipping %s", error)


def _probe_all(
    src_dir: Path, files: list[list[Path]], tile: int, on_bad_image: str
) -> list[_Image]:
    images = []
    for label, group in enumerate(files):
        for path in group:
            try:
                width, height, mode = probe(path)
            except BadImage as error:
                _skip_or_fail(error, on_bad_image)
                continue
            if width < tile or height < tile:
                raise UserError(
                    f"image {path} is {width}x{height}, smaller than the tile ({tile} px): "
                    "lower the tile size or remove the image"
                )
            rel = path.relative_to(src_dir).as_posix()
            images.append(_Image(path, rel, label, width, height, mode))
    first: dict[str, _Image] = {}
    for image in images:
        first.setdefault(image.mode, image)
    if len(first) > 1:
        raise UserError(
            f"mixed greyscale and colour images: {first['L'].path} is greyscale but "
            f"{first['RGB'].path} is colour; convert all images to one of the two"
        )
    return images


def _pick_holdout(classes: list[str], images: list[_Image], holdout: float, seed: int) -> set[str]:
    """Per class round(holdout * n) sources (at least 1 when holdout > 0), seeded."""
    rng = np.random.Generator(np.random.PCG64(seed))
    chosen: set[str] = set()
    for label, name in enumerate(classes):
        members = [image.rel for image in images if image.label == label]
        if not members:
            raise UserError(f"class {name!r} has no readable images left")
        k = max(1, round(holdout * len(members))) if holdout > 0 else 0
        if len(members) - k < 2:
            raise UserError(
                f"class {name!r} has {len(members)} source images; holdout {holdout} keeps {k} "
                f"for the held-out test, leaving {len(members) - k} (local sets need at least "
                "2): add source images or lower holdout"
            )
        chosen.update(members[int(i)] for i in rng.choice(len(members), k, replace=False))
    return chosen


def _existing(out_dir: Path, fp: str) -> Manifest | None:
    """The dataset already in out_dir when it is this very one; None when out_dir is free."""
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise UserError(f"output {out_dir} exists and is not a directory")
    if not any(out_dir.iterdir()):
        return None
    refuse = UserError(
        f"output directory {out_dir} already holds other files or a dataset prepared from "
        "different images or parameters; choose another output directory or delete it"
    )
    if not (out_dir / "manifest.json").is_file():
        raise refuse
    try:
        manifest = Manifest.load(out_dir / "manifest.json")
    except UserError:
        raise refuse from None
    if (manifest.prepared_from or {}).get("listing_sha256") != fp:
        raise refuse
    for file in manifest.files():
        path = out_dir / file.path
        if not path.is_file() or path.stat().st_size != file.bytes:
            raise UserError(
                f"dataset {out_dir} is damaged ({file.path} missing or short); delete it"
            )
    return manifest


def _encode_all(
    work: Path,
    images: list[_Image],
    margin: int,
    block: int,
    lossless: bool,
    workers: int,
    on_bad_image: str,
    progress: bool,
) -> list[_Image | None]:
    """Encode every source not encoded by an earlier, killed run; returns the readable ones."""
    (work / "parts").mkdir(exist_ok=True)
    parts = [work / "parts" / f"{i:06d}" for i in range(len(images))]
    todo = [i for i, part in enumerate(parts) if not _encoded(part)]
    jobs = [(images[i].path, images[i].mode, margin, block, lossless, parts[i]) for i in todo]
    bad: set[int] = set()
    with ProcessPoolExecutor(workers) as pool:
        results = pool.map(_cut, jobs)
        for i, result in track(
            zip(todo, results, strict=True),
            total=len(images),
            completed=len(images) - len(todo),
            description="Encoding blocks",
            disable=not progress,
        ):
            if result is not None:
                _skip_or_fail(result, on_bad_image)
                bad.add(i)
    return [image if i not in bad else None for i, image in enumerate(images)]


def _encoded(part: Path) -> bool:
    """Whether a killed run left this source encoded, with the hash this version writes (an
    older version's sha256 part is encoded again)."""
    try:
        meta = json.loads(part.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("block_hash") == BLOCK_HASH


def _write_shards(work: Path, images: list[_Image | None], tmp: Path) -> tuple[list, list]:
    """Concatenate the per-source parts into shards of about SHARD_BYTES; sources never span two."""
    (tmp / "shards").mkdir()
    shards: list[str] = []
    entries: list[dict] = []
    size = SHARD_BYTES
    for i, image in enumerate(images):
        if image is None:
            continue
        part = work / "parts" / f"{i:06d}"
        blocks = json.loads(part.with_suffix(".json").read_text())
        lengths, hashes = blocks["lengths"], blocks["hashes"]
        length = sum(lengths)
        if size > 0 and size + length > SHARD_BYTES:
            shards.append(f"shards/s{len(shards):05d}.bin")
            size = 0
        with open(tmp / shards[-1], "ab") as shard, open(part.with_suffix(".bin"), "rb") as src:
            shutil.copyfileobj(src, shard)
        entries.append(
            {
                "path": image.rel,
                "label": image.label,
                "width": image.width,
                "height": image.height,
                "shard": len(shards) - 1,
                "offset": size,
                "lengths": lengths,
                "hashes": hashes,
            }
        )
        size += length
    return shards, entries


def _shard_entry(root: Path, shard: str) -> dict[str, object]:
    digest = hashlib.sha256()
    with open(root / shard, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return {"path": shard, "bytes": (root / shard).stat().st_size, "sha256": digest.hexdigest()}


def prepare(
    src_dir: Path,
    out_dir: Path,
    tile: int,
    overlap: float,
    holdout: float,
    seed: int = 0,
    on_bad_image: Literal["fail", "skip"] = "fail",
    progress: bool = True,
    angles: str = DEFAULT_ANGLES,
    lossless: bool = False,
    workers: int = 0,
) -> Manifest:
    """Build (or find already built) the dataset of src_dir in out_dir and return its manifest.

    workers = 0: one encoding process per CPU.
    """
    src_dir, out_dir = Path(src_dir).resolve(), Path(out_dir).resolve()
    workers = workers or os.cpu_count() or 1
    _check_parameters(tile, overlap, holdout, seed, workers)
    angle_range = parse_angles(angles)
    if out_dir.is_relative_to(src_dir) or src_dir.is_relative_to(out_dir):
        raise UserError(f"output {out_dir} and source {src_dir} must not contain each other")
    classes, files = scan(src_dir)
    stride, margin = stride_for(tile, overlap), margin_for(tile)
    block = block_for(stride)
    codec = "png" if lossless else "jpeg"
    params = [tile, overlap, holdout, seed, list(angle_range), codec, on_bad_image]
    fp = _fingerprint(src_dir, files, json.dumps(params))
    found = _existing(out_dir, fp)
    if found is not None:
        return found
    images = _probe_all(src_dir, files, tile, on_bad_image)
    _pick_holdout(classes, images, holdout, seed)  # fail before the expensive part
    work = out_dir.with_name(f".{out_dir.name}.partial")
    if (work / "fingerprint").is_file() and (work / "fingerprint").read_text() != fp:
        shutil.rmtree(work)  # left by an interrupted run over other images or parameters
    work.mkdir(parents=True, exist_ok=True)
    (work / "fingerprint").write_text(fp)
    try:
        encoded = _encode_all(
            work, images, margin, block, lossless, workers, on_bad_image, progress
        )
    except UserError:
        shutil.rmtree(work)  # a bad image: once fixed, the listing differs and nothing is reusable
        raise
    kept = [image for image in encoded if image is not None]
    held = _pick_holdout(classes, kept, holdout, seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        shards, sources = _write_shards(work, encoded, tmp)
        doc = {
            "format": FORMAT,
            "block_hash": BLOCK_HASH,
            "tile": tile,
            "overlap": overlap,
            "stride": stride,
            "margin": margin,
            "block": block,
            "angles": list(angle_range),
            "codec": codec,
            "holdout": holdout,
            "seed": seed,
            "mode": kept[0].mode,
            "classes": classes,
            "sources": [s | {"holdout": s["path"] in held} for s in sources],
            "shards": [_shard_entry(tmp, shard) for shard in shards],
            "prepared_from": {"listing_sha256": fp},
        }
        (tmp / "manifest.json").write_bytes(encode(doc))
        tmp.chmod(0o755)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above; fails safely if something appeared since
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return Manifest.load(out_dir / "manifest.json")
