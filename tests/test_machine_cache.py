"""The execute machine's cache outlives runs: what no job has used for STALE_DAYS goes."""

import os
import time
from pathlib import Path

from node_payload import machine_cache, model_cache

DAY = 86400


def _age(path: Path, days: float) -> None:
    then = time.time() - days * DAY
    os.utime(path, (then, then), follow_symlinks=False)


def test_a_job_removes_runs_and_payloads_no_job_used_for_stale_days(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    models = cache / model_cache.MODELS
    old, recent = models / "old-run", models / "recent-run"
    for folder in (old, recent):
        folder.mkdir(parents=True)
        (folder / "global_r003.safetensors").write_bytes(b"x" * 100)
    _age(old, machine_cache.STALE_DAYS + 1)
    _age(recent, machine_cache.STALE_DAYS - 1)
    payloads = cache / "payloads"
    payloads.mkdir()
    (payloads / "a.pyz").write_bytes(b"old")
    _age(payloads / "a.pyz", machine_cache.STALE_DAYS + 1)

    mine = model_cache.run_folder(str(cache), "this run")
    assert mine is not None and mine.is_dir()
    assert sorted(p.name for p in models.iterdir()) == sorted(["recent-run", mine.name])
    assert (payloads / "a.pyz").exists()  # only the kind's folder a job opens is swept
    assert machine_cache.private_folder(str(cache), "payloads", "") == payloads
    assert not list(payloads.iterdir())


def test_opening_a_runs_folder_marks_it_used(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    first = model_cache.run_folder(cache, "run")
    assert first is not None
    _age(first, machine_cache.STALE_DAYS + 1)
    assert model_cache.run_folder(cache, "run") == first
    assert time.time() - first.stat().st_mtime < DAY
    assert first.is_dir()


def test_a_stale_link_is_removed_and_what_it_points_at_is_not(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("mine")
    models = tmp_path / "cache" / model_cache.MODELS
    models.mkdir(parents=True)
    (models / "link").symlink_to(elsewhere)
    _age(models / "link", machine_cache.STALE_DAYS + 1)
    assert model_cache.run_folder(str(tmp_path / "cache"), "run") is not None
    assert not (models / "link").is_symlink()
    assert (elsewhere / "keep").read_text() == "mine"
