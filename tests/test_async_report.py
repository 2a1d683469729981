"""The asynchronous report's bytes: its jobs' byte records summed as a synchronous report sums
its rounds' (aggregation/round_bytes.py), so both modes' report.json compare."""

import json
from pathlib import Path

import pytest

from aggregation.async_report import run_bytes
from node_payload.common.job_bytes import JobBytes, Moved
from node_payload.common.run_layout import METRICS_FILE, lane_job_dir

DENSE = JobBytes(
    through_submit_host=Moved(model_in=100, payload_in=50, update_out=100),
    from_mirrors=Moved(data_in=1000),
)
COMPRESSED = JobBytes(
    through_submit_host=Moved(model_in=100, payload_in=50, update_out=5),
    from_mirrors=Moved(data_in=900),
    on_machine=Moved(residual_in=100, residual_out=100),
)


def _job(run_dir: Path, key: str, metrics: object) -> tuple[str, object, int]:
    lane, step = map(int, key.split(":"))
    path = lane_job_dir(run_dir, lane, step) / METRICS_FILE
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(metrics))
    return key, metrics, path.stat().st_size


def test_the_jobs_bytes_are_summed_with_their_metrics_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = [
        _job(tmp_path, "0:0", {"bytes": DENSE.to_json()}),
        _job(tmp_path, "0:1", {"bytes": COMPRESSED.to_json(), "residual": "loaded"}),
        _job(tmp_path, "1:1", {"bytes": COMPRESSED.to_json(), "residual": "none"}),
        _job(tmp_path, "1:2", {"bytes": {"through_submit_host": {"model_in": -1}}}),
    ]
    report = run_bytes(tmp_path, {key: metrics for key, metrics, _ in jobs})
    sizes = [size for _, _, size in jobs[:3]]
    total = DENSE.with_metrics(sizes[0])
    total += COMPRESSED.with_metrics(sizes[1]) + COMPRESSED.with_metrics(sizes[2])
    assert report == {
        "bytes": total.to_json(),
        "submit_host_bytes": 250 + 155 + 155 + sum(sizes),
        "bytes_per_job": round((250 + 155 + 155 + sum(sizes)) / 3),
        "jobs_counted": 3,
        "residual_misses": 1,  # lane 1's second job; a lane's first has no residual to miss
    }
    assert capsys.readouterr().out == "lane 1 job 2: bytes left out: no byte record\n"


def test_jobs_without_byte_records_add_nothing(tmp_path: Path) -> None:
    key, metrics, _ = _job(tmp_path, "0:0", {"seconds": 1.0})
    assert run_bytes(tmp_path, {key: metrics}) == {}
