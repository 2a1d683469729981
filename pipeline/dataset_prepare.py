"""Turn an ImageFolder tree (one subfolder per class) into a dagtrain dataset directory.

Nodes fetch individual fragments by byte range over FTP, so every source image is cut into
tiles once, here, each tile PNG-encoded and appended to a shard file; the manifest records where
each fragment lives and its sha256.

Fragment grid: stride s = max(1, round(tile * (1 - overlap))); a W x H image yields
nx * ny fragments with nx = (W - tile) // s + 1 and ny = (H - tile) // s + 1, at x = 0, s, 2s, ...
(the right and bottom margins smaller than a stride are dropped). Example: 2272 x 1704,
tile 256, overlap 0.5 -> s = 128, nx = 16, ny = 12, 192 fragments.

16-bit images are scaled to 8 bits over the full range (v / 257), the same for every image, so
that intensities stay comparable between images. The output is written into a temporary
directory beside OUT_DIR and renamed at the end: OUT_DIR either holds a complete dataset or
nothing of this run.
"""

import hashlib
import io
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

from node_payload.errors import UserError
from node_payload.manifest import COLUMNS, FORMAT, Manifest, encode

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
SHARD_BYTES = 64 * 2**20
_GREY = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N"}
_COLOUR = {"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr"}


class _BadImage(Exception):
    """An unreadable, truncated or unsupported image file (skippable with on_bad_image="skip")."""


@dataclass(frozen=True)
class _Image:
    path: Path
    rel: str
    label: int
    width: int
    height: int
    mode: str  # "L" or "RGB"


def _check_parameters(tile: int, overlap: float, holdout: float, seed: int) -> None:
    if tile < 1:
        raise UserError(f"tile must be a positive number of pixels, not {tile}")
    if not 0 <= overlap < 1:
        raise UserError(f"overlap must be in [0, 1), not {overlap}")
    if not 0 <= holdout < 1:
        raise UserError(f"holdout must be in [0, 1), not {holdout}")
    if seed < 0:
        raise UserError(f"seed must be non-negative, not {seed}")


def _scan(src_dir: Path) -> tuple[list[str], list[list[Path]]]:
    """Class names (sorted subfolders) and each class's image files (sorted, recursive)."""
    if not src_dir.is_dir():
        raise UserError(f"source directory {src_dir} does not exist or is not a directory")
    classes = sorted(p.name for p in src_dir.iterdir() if p.is_dir() and p.name[0] != ".")
    if not classes:
        raise UserError(f"{src_dir} has no class folders; put each class's images in a subfolder")
    files = []
    for name in classes:
        found = sorted(
            p
            for p in (src_dir / name).rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and p.name[0] != "."
        )
        if not found:
            raise UserError(f"class folder {src_dir / name} holds no PNG, JPEG or TIFF images")
        files.append(found)
    return classes, files


def _fingerprint(src_dir: Path, files: list[list[Path]], on_bad_image: str) -> str:
    """Identifies the source listing (paths and contents), to recognise a re-run of prepare."""
    digest = hashlib.sha256(on_bad_image.encode())
    for path in (p for group in files for p in group):
        digest.update(path.relative_to(src_dir).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _probe(path: Path) -> tuple[int, int, str]:
    """Width, height and target mode from the header alone (cheap, to fail fast)."""
    try:
        with Image.open(path) as image:
            mode, size = image.mode, image.size
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _BadImage(f"cannot read image {path}: {exc}") from None
    if mode in _GREY:
        return *size, "L"
    if mode in _COLOUR:
        return *size, "RGB"
    raise _BadImage(f"image {path} has unsupported pixel mode {mode!r}")


def _decode(path: Path, mode: str) -> np.ndarray:
    """Full decode to uint8 in the dataset mode; 16-bit grey is scaled by 1/257."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode.startswith("I"):
                wide = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
                return ((wide + 128) // 257).astype(np.uint8)
            return np.asarray(image.convert(mode))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _BadImage(f"cannot decode image {path} (truncated or corrupt?): {exc}") from None


def _cut(
    job: tuple[Path, str, int, int],
) -> tuple[bytes, list[tuple[int, int, int, str]]] | _BadImage:
    """One source's fragments, concatenated, with (x, y, length, sha256) per fragment.

    A bad image is returned rather than raised, so that it does not end the ordered map.
    """
    path, mode, tile, stride = job
    try:
        pixels = _decode(path, mode)
    except _BadImage as error:
        return error
    height, width = pixels.shape[:2]
    blob = io.BytesIO()
    rows = []
    for y in range(0, height - tile + 1, stride):
        for x in range(0, width - tile + 1, stride):
            buffer = io.BytesIO()
            Image.fromarray(pixels[y : y + tile, x : x + tile]).save(
                buffer, "PNG", compress_level=1
            )
            data = buffer.getvalue()
            blob.write(data)
            rows.append((x, y, len(data), hashlib.sha256(data).hexdigest()))
    return blob.getvalue(), rows


def _skip_or_fail(error: _BadImage, on_bad_image: str) -> None:
    if on_bad_image != "skip":
        raise UserError(f"{error}; fix or remove the file, or prepare with on_bad_image='skip'")
    log.warning("skipping %s", error)


def _probe_all(
    src_dir: Path, files: list[list[Path]], tile: int, on_bad_image: str
) -> list[_Image]:
    images = []
    for label, group in enumerate(files):
        for path in group:
            try:
                width, height, mode = _probe(path)
            except _BadImage as error:
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


def _source_entry(image: _Image, holdout: bool) -> dict[str, object]:
    return {
        "path": image.rel,
        "label": image.label,
        "width": image.width,
        "height": image.height,
        "holdout": holdout,
    }


def _existing(
    out_dir: Path, tile: int, overlap: float, holdout: float, seed: int, fp: str
) -> Manifest | None:
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
    same = (manifest.tile, manifest.overlap, manifest.holdout, manifest.seed) == (
        tile,
        overlap,
        holdout,
        seed,
    )
    if not same or (manifest.prepared_from or {}).get("listing_sha256") != fp:
        raise refuse
    ends: dict[str, int] = {}
    for fragment in manifest.fragments:
        ends[fragment.shard] = max(ends.get(fragment.shard, 0), fragment.offset + fragment.length)
    for shard, end in ends.items():
        path = out_dir / shard
        if not path.is_file() or path.stat().st_size < end:
            raise UserError(f"dataset {out_dir} is damaged ({shard} missing or short); delete it")
    return manifest


def _write_shards(
    tmp: Path, images: list[_Image], tile: int, stride: int, on_bad_image: str, progress: bool
) -> tuple[list[_Image], list[str], list[list]]:
    """Cut images in worker processes (PNG encoding dominates) and append them to shards."""
    (tmp / "shards").mkdir()
    kept: list[_Image] = []
    shards: list[str] = []
    rows: list[list] = []
    size = SHARD_BYTES
    jobs = [(image.path, image.mode, tile, stride) for image in images]
    pool = ProcessPoolExecutor(min(os.cpu_count() or 1, 2))
    try:
        results = pool.map(_cut, jobs)
        for image, result in track(
            zip(images, results, strict=True),
            total=len(images),
            description="Cutting fragments",
            disable=not progress,
        ):
            if isinstance(result, _BadImage):
                _skip_or_fail(result, on_bad_image)
                continue
            blob, cut = result
            if size > 0 and size + len(blob) > SHARD_BYTES:
                shards.append(f"shards/s{len(shards):05d}.bin")
                size = 0
            with open(tmp / shards[-1], "ab") as shard:
                shard.write(blob)
            offset = size
            for x, y, length, sha256 in cut:
                rows.append([len(kept), x, y, len(shards) - 1, offset, length, sha256])
                offset += length
            size += len(blob)
            kept.append(image)
    finally:
        pool.shutdown(cancel_futures=True)
    return kept, shards, rows


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
) -> Manifest:
    """Build (or find already built) the dataset of src_dir in out_dir and return its manifest."""
    src_dir, out_dir = Path(src_dir).resolve(), Path(out_dir).resolve()
    _check_parameters(tile, overlap, holdout, seed)
    if out_dir.is_relative_to(src_dir) or src_dir.is_relative_to(out_dir):
        raise UserError(f"output {out_dir} and source {src_dir} must not contain each other")
    classes, files = _scan(src_dir)
    fp = _fingerprint(src_dir, files, on_bad_image)
    found = _existing(out_dir, tile, overlap, holdout, seed, fp)
    if found is not None:
        return found
    images = _probe_all(src_dir, files, tile, on_bad_image)
    _pick_holdout(classes, images, holdout, seed)  # fail before the expensive part
    stride = max(1, round(tile * (1 - overlap)))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        images, shards, rows = _write_shards(tmp, images, tile, stride, on_bad_image, progress)
        held = _pick_holdout(classes, images, holdout, seed)
        doc = {
            "format": FORMAT,
            "tile": tile,
            "overlap": overlap,
            "holdout": holdout,
            "seed": seed,
            "mode": images[0].mode,
            "classes": classes,
            "sources": [_source_entry(image, image.rel in held) for image in images],
            "shards": [_shard_entry(tmp, shard) for shard in shards],
            "fragments": {"columns": COLUMNS, "rows": rows},
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
    return Manifest.load(out_dir / "manifest.json")
