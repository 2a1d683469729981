"""TensorBoard scalars of a run, written by its aggregations into RUN_DIR/tensorboard/.

Each aggregation writes one event file, named by the model version it made: a synchronous round
(version round + 1), an asynchronous version, and the FINAL report of an asynchronous run (its
held-out evaluations, which only the report computes). A file is replaced whole, atomically, so a
rerun of an aggregation (DAGMan retry, rescue, a resumed local run) writes its points again
instead of adding them twice, and a live `tensorboard --logdir RUN_DIR` reads each new file as
it appears. The aggregation runs in the run directory on the submit host, on a pool as locally,
so the files are where TensorBoard looks with nothing to transfer.

The writer is the standard library's: the aggregation runs from the job payload with the submit
host's Python, which has torch but need not have the tensorboard package that
torch.utils.tensorboard imports. An event file is a sequence of records (length, CRC-32C,
protobuf `Event`), and a scalar needs only four protobuf fields; nothing is pickled.
"""

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node_payload.common.atomic_file import replacing
from node_payload.common.run_layout import TENSORBOARD_DIR

# Every file is named events.out.tfevents.* (TensorBoard reads no other name) and sorts by version,
# as TensorBoard's older loader reads a directory's files in name order and never goes back.
FILE_PREFIX = "events.out.tfevents."
FILE_VERSION = b"brain.Event:2"  # the format: a file_version event starts each file


@dataclass(frozen=True)
class Point:
    """Scalars (tag -> value) of one model version, at the time it was made."""

    step: int
    wall_time: float
    scalars: Mapping[str, float]


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + _masked_crc(length) + data + _masked_crc(data)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, wall_time: float, field: bytes) -> bytes:
    """Event{wall_time = 1 (double), step = 2 (int64), and one more field}."""
    return b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step) + field


def _summary(scalars: Mapping[str, float]) -> bytes:
    """Event.summary = 5: Summary{repeated value = 1: Value{tag = 1, simple_value = 2 (float)}}."""
    values = b"".join(
        _bytes_field(1, _bytes_field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
        for tag, value in scalars.items()
    )
    return _bytes_field(5, values)


def event_file(points: Iterable[Point]) -> bytes:
    points = list(points)
    first = min((p.wall_time for p in points), default=0.0)
    records = [_record(_event(0, first, _bytes_field(3, FILE_VERSION)))]
    records += [_record(_event(p.step, p.wall_time, _summary(p.scalars))) for p in points]
    return b"".join(records)


def write_points(run_dir: Path, name: str, points: Iterable[Point]) -> Path:
    """RUN_DIR/tensorboard/events.out.tfevents.NAME holding `points`, replacing what it held."""
    path = run_dir / TENSORBOARD_DIR / f"{FILE_PREFIX}{name}"
    path.parent.mkdir(exist_ok=True)
    with replacing(path) as tmp:
        tmp.write_bytes(event_file(points))
    return path


def _heldout(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        "heldout/accuracy": metrics["accuracy"],
        "heldout/image_accuracy": metrics["image_accuracy"],
        "heldout/loss": metrics["loss"],
    }


def log_round(run_dir: Path, metrics: Mapping[str, Any]) -> None:
    """A synchronous round's scalars (its round.json) at the version it made."""
    scalars = {
        **_heldout(metrics),
        "updates/nodes_used": metrics["nodes_used"],
        "updates/nodes_missing": len(metrics["nodes_missing"]),
        "updates/rejected": len(metrics["nodes_rejected"]),
        "updates/bytes": metrics["update_bytes"],
        "data/bytes_downloaded": metrics["bytes_downloaded"],
        "time/seconds": metrics["seconds"],
    }
    version = metrics["round"] + 1
    point = Point(version, metrics["started_at"] + metrics["seconds"], scalars)
    write_points(run_dir, f"round.{version:06d}", [point])


def log_version(
    run_dir: Path, entry: Mapping[str, Any], seconds: float, nodes_used: int, update_bytes: int
) -> None:
    """An asynchronous version's scalars (`entry`: its record in the ledger's versions); the
    staleness of the updates it took, the seconds since the version before."""
    staleness = entry["staleness"]
    scalars = {
        "updates/nodes_used": nodes_used,
        "updates/bytes": update_bytes,
        "updates/staleness_mean": sum(staleness) / len(staleness),
        "updates/staleness_max": max(staleness),
        "time/seconds": seconds,
    }
    version = entry["version"]
    write_points(run_dir, f"version.{version:06d}", [Point(version, entry["at"], scalars)])


def log_evaluations(
    run_dir: Path, evaluations: Iterable[Mapping[str, Any]], started_at: float
) -> None:
    """An asynchronous run's held-out evaluations (the report's), by version; the name sorts
    after every version's file."""
    points = [Point(e["version"], started_at + e["seconds"], _heldout(e)) for e in evaluations]
    write_points(run_dir, "version.heldout", points)
