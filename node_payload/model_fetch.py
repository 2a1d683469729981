"""The global model from the mirrors, as its pointer describes it, with the data's failover.

The model is read whole over the same sessions, failover and backoff as the dataset's blocks
(node_payload.fetch), starting at the node's own first mirror so a round's nodes spread over the
mirrors. A mirror is believed only up to the pointer: a SIZE above its `bytes` is a lie, and a
copy whose sha256 is not the pointer's is never written, let alone trained on; both move the read
to another mirror, and a mirror caught serving the wrong model is not asked again by this job.

When the pointer names a delta from the version before and the machine's cache holds that
version (node_payload/model_cache.py, checked by sha256), the job reads only the delta, applies
it (node_payload/common/model_delta.py) and keeps the result only if its sha256 is the
pointer's. Any miss (no cached version, a wrong one, no mirror serving the delta, a delta that
does not apply or makes other bytes) is one line saying why, and the model is read whole;
metrics.json says how the model came ("model").
"""

import sys
from dataclasses import dataclass
from pathlib import Path

from node_payload import model_cache
from node_payload.common.job_bytes import JobBytes, Moved
from node_payload.common.model_delta import BadDelta, DeltaIdentity, apply_delta
from node_payload.common.model_pointer import DeltaPointer, ModelPointer, read_pointer
from node_payload.fetch import DataUnreachable, FetchStats, fetch_file


@dataclass(frozen=True)
class GotModel:
    """The model file a job trains, how it came ("given": by file transfer; "whole"; "delta";
    "whole: why the delta was not used") and the bytes that brought it."""

    path: Path
    how: str
    moved: JobBytes


def _whole(pointer: ModelPointer, mirrors: list[str], first: int, stats: FetchStats) -> bytes:
    """The pointer's model once a mirror served its exact bytes; raises DataUnreachable (a
    retryable exit) when none did."""
    return fetch_file(
        mirrors,
        first,
        pointer.path,
        stats,
        expected_sha256=pointer.sha256,
        max_bytes=pointer.bytes,
        expected_as="the run published",
    )


def _by_delta(
    pointer: ModelPointer,
    delta: DeltaPointer,
    mirrors: list[str],
    first: int,
    folder: Path | None,
    stats: FetchStats,
    out_dir: Path,
) -> tuple[bytes | None, str, int]:
    """The model made of the cached version before and the delta, or None and why not; and
    the cached bytes read."""
    base, why = model_cache.cached(folder, delta.base_version, delta.base_sha256)
    if base is None:
        return None, why, 0
    try:
        raw = fetch_file(
            mirrors,
            first,
            delta.path,
            stats,
            passes=1,  # the whole model is the fallback: no backoff for its delta
            expected_sha256=delta.sha256,
            max_bytes=delta.bytes,
            expected_as="the run published",
        )
    except DataUnreachable as exc:
        return None, f"no mirror served its delta ({exc})", len(base)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / Path(delta.path).name
    path.write_bytes(raw)
    identity = DeltaIdentity(
        pointer.run_id, delta.base_version, pointer.version, delta.base_sha256, pointer.sha256
    )
    try:
        return apply_delta(base, path, identity), "", len(base)
    except BadDelta as exc:
        return None, f"its delta was refused: {exc}", len(base)
    finally:
        path.unlink(missing_ok=True)


def model_file(
    given: Path, run_id: str, mirrors: list[str], first: int, node_cache: str, out_dir: Path
) -> GotModel:
    """The model a node job trains: the file it was given, or, given a pointer (`.json`), the
    model from the mirrors that hold it (by delta when it can), written into the job's folder
    (which returns only its outputs). `first` is the node's first mirror of all the run's."""
    given_bytes = Moved(model_in=given.stat().st_size)
    if given.suffix != ".json":
        return GotModel(given, "given", JobBytes(through_submit_host=given_bytes))
    pointer = read_pointer(given, run_id, len(mirrors))
    holding = [mirrors[m] for m in pointer.mirrors]
    start = first % len(holding)
    folder = model_cache.run_folder(node_cache, run_id)
    whole, by_delta = FetchStats(), FetchStats()
    data, how, cache_read = None, "whole", 0
    if pointer.delta is not None:
        data, why, cache_read = _by_delta(
            pointer, pointer.delta, holding, start, folder, by_delta, out_dir
        )
        how = "delta" if data is not None else f"whole: {why}"
        if data is None:
            print(
                f"model version {pointer.version}: fetched whole, not by delta: {why}",
                file=sys.stderr,
            )
    if data is None:
        data = _whole(pointer, holding, start, whole)
    target = out_dir / Path(pointer.path).name
    out_dir.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    model_cache.keep(folder, pointer.version, data)
    moved = JobBytes(
        through_submit_host=given_bytes,
        from_mirrors=Moved(
            model_in=whole.bytes_downloaded, model_delta_in=by_delta.bytes_downloaded
        ),
        on_machine=Moved(model_in=cache_read),
    )
    return GotModel(target, how, moved)
