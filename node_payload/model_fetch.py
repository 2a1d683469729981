"""The global model from the mirrors, as its pointer describes it, with the data's failover.

The model is read whole over the same sessions, failover and backoff as the dataset's blocks
(node_payload.fetch), starting at the node's own first mirror so a round's nodes spread over the
mirrors. A mirror is believed only up to the pointer: a SIZE above its `bytes` is a lie, and a
copy whose sha256 is not the pointer's is never written, let alone trained on; both move the read
to another mirror, and a mirror caught serving the wrong model is not asked again by this job.
"""

from pathlib import Path

from node_payload.common.model_pointer import ModelPointer, read_pointer
from node_payload.fetch import FetchStats, fetch_file


def fetch_model(
    pointer: ModelPointer, mirrors: list[str], first: int, stats: FetchStats, target: Path
) -> Path:
    """Write the pointer's model to `target` once a mirror served its exact bytes; raises
    DataUnreachable (a retryable exit) when none did."""
    data = fetch_file(
        mirrors,
        first,
        pointer.path,
        stats,
        expected_sha256=pointer.sha256,
        max_bytes=pointer.bytes,
        expected_as="the run published",
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


def model_file(
    given: Path, run_id: str, mirrors: list[str], first: int, stats: FetchStats, out_dir: Path
) -> Path:
    """The model a node job trains: the file it was given, or, given a pointer (`.json`), the
    model fetched from the mirrors that hold it into the job's folder (which returns only its
    outputs). `first` is the node's first mirror of all the run's."""
    if given.suffix != ".json":
        return given
    pointer = read_pointer(given, run_id, len(mirrors))
    holding = [mirrors[m] for m in pointer.mirrors]
    target = out_dir / Path(pointer.path).name
    return fetch_model(pointer, holding, first % len(holding), stats, target)
