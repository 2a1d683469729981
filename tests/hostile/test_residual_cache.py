"""Hostile residuals: a file in an execute machine's residual cache that is not the lane's own
(another run, lane, step or model, unreadable, NaN) is named in one warning line and never
used: the job starts from zero and writes its own residual over nothing of the other's."""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from node_payload import residual_cache
from node_payload.common import tensor_io
from node_payload.residual_cache import Residual

RUN_ID = "run-a"
LANE, STEP = 0, 5  # the job that looks: lane 0, step 5; it finds the file of step 4
STEPS_FILE = "l000_j0004.safetensors"


def _reference() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(40, 25), "b": torch.zeros(7)}


def _residual(**v: torch.Tensor) -> Residual:
    return Residual(v=v or {n: torch.full_like(t, 0.5) for n, t in _reference().items()}, jobs=4)


def _save(folder: Path, residual: Residual, run_id: str = RUN_ID, lane: int = 0, step: int = 4):
    """Written as residual_cache.save would, then moved under the name the job looks for."""
    metadata = tensor_io.residual_metadata(run_id, lane, residual.jobs, step)
    tensors = {f"{n}::v": t for n, t in residual.v.items()}
    tensor_io.save_tensors(folder / STEPS_FILE, tensors, metadata)


def _other_run(folder):
    _save(folder, _residual(), run_id="run-b")


def _other_lane(folder):
    _save(folder, _residual(), lane=3)


def _other_step(folder):
    _save(folder, _residual(), step=5)


def _garbage(folder):
    (folder / STEPS_FILE).write_bytes(b"not a tensor file at all")


def _pickle(folder):
    torch.save(_reference(), folder / STEPS_FILE)


def _nan(folder):
    residual = _residual()
    residual.v["w"][3, 3] = float("nan")
    _save(folder, residual)


def _other_shape(folder):
    _save(folder, _residual(w=torch.zeros(25, 40), b=torch.zeros(7)))


def _other_names(folder):
    _save(folder, _residual(w=torch.zeros(40, 25)))


def _other_dtype(folder):
    _save(folder, _residual(w=torch.zeros(40, 25, dtype=torch.float64), b=torch.zeros(7)))


CASES = [
    (_other_run, "it belongs to run 'run-b', this is run 'run-a'"),
    (_other_lane, "it belongs to lane '3', this is lane 0"),
    (_other_step, "it says step '5', its name says step 4"),
    (_garbage, "unreadable"),
    (_pickle, "unreadable"),
    (_nan, "tensor 'w::v' contains NaN or Inf"),
    (_other_names, "its tensors are not those of this model"),
    (_other_shape, "tensor 'w::v' is torch.float32 (25, 40), not float32 (40, 25)"),
    (_other_dtype, "tensor 'w::v' is torch.float64 (40, 25), not float32 (40, 25)"),
]


@pytest.mark.parametrize(("plant", "why"), CASES)
def test_a_foreign_residual_is_named_in_one_line_and_never_used(
    tmp_path: Path, capsys, plant: Callable[[Path], None], why: str
) -> None:
    folder = residual_cache.run_cache(str(tmp_path), RUN_ID)
    plant(folder)
    found = residual_cache.load(folder, RUN_ID, LANE, STEP, _reference(), 0.0)
    assert found.residual == Residual() and found.bytes == 0
    assert found.how.startswith("ignored: ") and why in found.how
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and STEPS_FILE in lines[0] and why in lines[0]
    assert "zero residual" in lines[0]


def test_a_residual_named_for_this_step_or_a_later_one_is_not_looked_at(tmp_path: Path) -> None:
    folder = residual_cache.run_cache(str(tmp_path), RUN_ID)
    for step in (5, 6):
        metadata = tensor_io.residual_metadata(RUN_ID, LANE, 1, step)
        tensors = {f"{n}::v": t for n, t in _residual().v.items()}
        tensor_io.save_tensors(folder / f"l000_j{step:04d}.safetensors", tensors, metadata)
    assert residual_cache.load(folder, RUN_ID, LANE, STEP, _reference(), 0.0).how == "none"


def test_a_cache_folder_of_another_user_or_a_link_is_not_used(tmp_path: Path, capsys) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "residuals").symlink_to(tmp_path / "elsewhere")
    assert residual_cache.run_cache(str(tmp_path / "cache"), RUN_ID) is None
    assert "is not a folder of this user's" in capsys.readouterr().err
    assert residual_cache.save(None, _residual(), RUN_ID, LANE, STEP) == 0
    assert not any((tmp_path / "elsewhere").iterdir())
    found = residual_cache.load(None, RUN_ID, LANE, STEP, _reference(), 0.0)
    assert found.how == "none"
