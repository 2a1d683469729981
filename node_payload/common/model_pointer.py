"""A published global model's pointer: what a node job gets instead of the model itself.

When the mirrors serve a run's models (`RunConfig.models_from_mirrors`), the aggregation writes
`models/global_rNNN.json` beside each model once the mirrors hold it, and a node job's submit
file transfers that pointer (a few hundred bytes) instead of the model (45 MB for resnet18). The
node fetches the model from the mirrors that hold it (all of them for embedded mirrors, those
the upload reached for `[data] publish`) and trains on it only if its size and sha256 are the
pointer's. From version 1 on, a pointer may also name a delta from the version before
(node_payload/common/model_delta.py): a node whose cache holds that version fetches the delta
instead, and still trains only on a model of the pointer's sha256. The pointer crosses the pool
like any other input, so a node reads it strictly: any other shape is one message naming the
file and the field. Standard library only.
"""

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from node_payload.common.errors import UserError
from node_payload.common.run_layout import published_delta_path, published_model_path

FORMAT = "dagtrain-model-pointer/2"
MAX_POINTER_BYTES = 4096  # a pointer is about 250 bytes: more is not a pointer
MAX_MODEL_BYTES = 16 * 2**30  # believed of no pointer: no classifier dagtrain builds is near it
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIELDS = ("format", "run_id", "version", "path", "bytes", "sha256", "mirrors", "delta")
_DELTA_FIELDS = ("path", "bytes", "sha256", "base_version", "base_sha256")


@dataclass(frozen=True)
class DeltaPointer:
    """Where the delta from the version before is, its size and sha256, and the sha256 of the
    model it applies to."""

    path: str  # published/RUN_ID/delta_rNNN.safetensors, on the mirrors that hold the model
    bytes: int
    sha256: str
    base_version: int
    base_sha256: str


@dataclass(frozen=True)
class ModelPointer:
    """Where a version of the global model is on the mirrors, and its size and sha256."""

    format: str
    run_id: str
    version: int
    path: str  # below each mirror's root: published/RUN_ID/global_rNNN.safetensors
    bytes: int
    sha256: str
    mirrors: tuple[int, ...]  # which of the run's [data] mirrors serve it, by their place
    delta: DeltaPointer | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def pointer_to(
    model: Path, run_id: str, version: int, mirrors: list[int], delta: DeltaPointer | None = None
) -> ModelPointer:
    """The pointer to a model file as the given mirrors (by their place) serve it."""
    return ModelPointer(
        FORMAT,
        run_id,
        version,
        published_model_path(run_id, version),
        model.stat().st_size,
        file_sha256(model),
        tuple(mirrors),
        delta,
    )


def read_pointer(path: Path, run_id: str, mirror_count: int) -> ModelPointer:
    """The pointer in `path`, for the run `run_id` with `mirror_count` mirrors; anything else is
    a UserError naming the file and the field."""

    def refused(why: str) -> UserError:
        return UserError(f"{path}: not a model pointer of this run: {why}; plan the run again")

    try:
        with path.open("rb") as f:
            raw = f.read(MAX_POINTER_BYTES + 1)
    except OSError as exc:
        raise UserError(f"{path}: cannot read the model pointer: {exc.strerror}") from None
    if len(raw) > MAX_POINTER_BYTES:
        raise refused(f"more than {MAX_POINTER_BYTES} bytes")
    try:
        fields = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise refused(f"not JSON ({exc})") from None
    if not isinstance(fields, dict) or sorted(fields) != sorted(_FIELDS):
        keys = sorted(fields) if isinstance(fields, dict) else type(fields).__name__
        raise refused(f"expected the fields {', '.join(_FIELDS)}, found {keys}")
    if fields["format"] != FORMAT:
        raise refused(f"format {fields['format']!r}, expected {FORMAT!r}")
    if fields["run_id"] != run_id:
        raise refused(f"run_id {fields['run_id']!r}, expected {run_id!r}")
    version = fields["version"]
    if type(version) is not int or not 0 <= version < 2**31:
        raise refused(f"version {version!r} is not a version number")
    _check_file(fields, "", refused)
    expected_path = published_model_path(run_id, version)
    if fields["path"] != expected_path:
        raise refused(f"path {fields['path']!r}, expected {expected_path!r}")
    held = fields["mirrors"]
    if (
        not isinstance(held, list)
        or not held
        or any(type(m) is not int or not 0 <= m < mirror_count for m in held)
        or held != sorted(set(held))
    ):
        raise refused(
            f"mirrors {held!r} is not a list of the places of the run's {mirror_count} mirrors "
            f"(0 to {mirror_count - 1}, ascending)"
        )
    delta = _read_delta(fields["delta"], run_id, version, refused)
    return ModelPointer(**(fields | {"mirrors": tuple(held), "delta": delta}))


def _check_file(fields: dict, where: str, refused: Callable[[str], UserError]) -> None:
    """A file's size and sha256 fields, as a pointer may claim them."""
    size, digest = fields["bytes"], fields["sha256"]
    if type(size) is not int or not 0 < size <= MAX_MODEL_BYTES:
        raise refused(f"{where}bytes {size!r} is not a size from 1 to {MAX_MODEL_BYTES}")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise refused(f"{where}sha256 {digest!r} is not 64 lowercase hex digits")


def _read_delta(
    raw: object, run_id: str, version: int, refused: Callable[[str], UserError]
) -> DeltaPointer | None:
    """The pointer's delta: none (null), or one from the version before to this one."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or sorted(raw) != sorted(_DELTA_FIELDS):
        keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise refused(
            f"delta: expected null or the fields {', '.join(_DELTA_FIELDS)}, found {keys}"
        )
    _check_file(raw, "delta ", refused)
    base = raw["base_version"]
    if type(base) is not int or base != version - 1 or base < 0:
        raise refused(f"delta base_version {base!r}, expected {version - 1}")
    if not isinstance(raw["base_sha256"], str) or not _SHA256.fullmatch(raw["base_sha256"]):
        raise refused(f"delta base_sha256 {raw['base_sha256']!r} is not 64 lowercase hex digits")
    expected_path = published_delta_path(run_id, version)
    if raw["path"] != expected_path:
        raise refused(f"delta path {raw['path']!r}, expected {expected_path!r}")
    return DeltaPointer(**raw)
