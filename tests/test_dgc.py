import dataclasses
import itertools
import json
import math
import os

import pytest
import torch

from aggregation.job_plan import JobPlan
from aggregation.validate import validate_update
from node_payload import dgc, machine_cache, node_job, residual_cache
from node_payload.common import model_file, sparse_update, tensor_io
from node_payload.common.models import build_model
from node_payload.common.run_config import RunConfig, read_run_config, to_toml
from node_payload.compression import write_update
from node_payload.dgc import DgcSettings
from node_payload.residual_cache import Residual
from pipeline import config

RUN_ID = "run-a"
PARAMS = {"w", "b"}


def _update(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(40, 25, generator=gen),
        "b": torch.randn(7, generator=gen),
        "running_mean": torch.randn(7, generator=gen),
        "count": torch.tensor(12 + seed),
    }


def _sent(result: dgc.Compressed, name: str) -> torch.Tensor:
    part = result.sparse[name]
    flat = torch.zeros(math.prod(part.shape))
    flat[part.positions] = part.values.float()
    return flat.reshape(part.shape)


def _config(cache, **compression) -> RunConfig:
    table = {"method": "dgc", "sparsity": 0.99, "warmup": 0, "momentum": 0.0, "clip_norm": 0.0}
    config = RunConfig().with_values("run", run_id=RUN_ID)
    config = config.with_values("data", node_cache=str(cache))
    return config.with_values("compression", **(table | compression))


# --- schedule and counts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("numel", "sparsity", "kept"),
    [(10_000, 0.99, 100), (10_000, 0.999, 10), (82_944, 0.999, 83), (24, 0.999, 1), (7, 0.0, 7)],
)
def test_kept_count(numel, sparsity, kept):
    assert dgc.kept_count(numel, sparsity) == kept


@pytest.mark.parametrize("sparsity", [0.99, 0.999])
def test_top_k_sends_exactly_k_values_per_tensor(sparsity):
    result = dgc.compress(_update(0), PARAMS, Residual(jobs=9), DgcSettings(sparsity, warmup=4), 9)
    assert result.sparsity == sparsity
    assert {n: len(p.values) for n, p in result.sparse.items()} == {
        "w": dgc.kept_count(1000, sparsity),
        "b": 1,
    }
    w = _update(0)["w"].flatten()
    assert set(result.sparse["w"].positions.tolist()) == set(
        w.abs().topk(dgc.kept_count(1000, sparsity)).indices.tolist()
    )


def test_warm_up_follows_the_paper():
    schedule = [dgc.sparsity_at(j, 0.999, 4) for j in range(6)]
    assert schedule == pytest.approx([0.75, 0.9371, 0.9842, 0.9960, 0.999, 0.999], abs=1e-4)
    assert dgc.sparsity_at(0, 0.999, 0) == 0.999
    assert dgc.sparsity_at(0, 0.5, 4) == 0.5
    longer = [dgc.sparsity_at(j, 0.99, 10) for j in range(11)]
    assert longer[0] == 0.75 and longer[-1] == 0.99
    assert all(a < b for a, b in itertools.pairwise(longer))


def test_a_lanes_jobs_step_through_the_warm_up_by_step_not_by_residual():
    residual, seen = Residual(), []
    for seed in range(5):
        result = dgc.compress(_update(seed), PARAMS, residual, DgcSettings(0.999, warmup=4), seed)
        seen.append(len(result.sparse["w"].values))
        residual = result.residual
    assert seen == [250, 63, 16, 4, 1] and residual.jobs == 5
    after_a_miss = dgc.compress(_update(9), PARAMS, Residual(), DgcSettings(0.999, warmup=4), 5)
    assert len(after_a_miss.sparse["w"].values) == 1


# --- error feedback, momentum, masking -----------------------------------------------------------


def test_sent_plus_residual_is_the_sum_of_the_inputs():
    residual, sent = Residual(), torch.zeros(40, 25)
    inputs = torch.zeros(40, 25)
    for seed in range(6):
        update = _update(seed)
        result = dgc.compress(update, PARAMS, residual, DgcSettings(0.99, warmup=2), seed)
        sent += _sent(result, "w")
        inputs += update["w"]
        residual = result.residual
    assert torch.allclose(sent + residual.v["w"], inputs, atol=1e-5)
    assert residual.u == {}


def test_momentum_correction_by_hand():
    settings = DgcSettings(sparsity=0.75, warmup=0, momentum=0.5)  # 1 of 4 values sent
    first = {"w": torch.tensor([1.0, -3.0, 0.5, 2.0])}
    one = dgc.compress(first, {"w"}, Residual(), settings, 0)
    # u = [1, -3, .5, 2]; v = u; -3 is sent; both are masked there.
    assert one.sparse["w"].positions.tolist() == [1]
    assert one.sparse["w"].values.tolist() == [-3.0]
    assert one.residual.u["w"].tolist() == [1.0, 0.0, 0.5, 2.0]
    assert one.residual.v["w"].tolist() == [1.0, 0.0, 0.5, 2.0]
    second = {"w": torch.tensor([0.5, 1.0, 1.0, -1.0])}
    two = dgc.compress(second, {"w"}, one.residual, settings, 1)
    # u = .5 u + g = [1, 1, 1.25, 0]; v = v + u = [2, 1, 1.75, 2]: the first of the tied 2s or
    # the second is sent, the other stays.
    u = torch.tensor([1.0, 1.0, 1.25, 0.0])
    v = torch.tensor([2.0, 1.0, 1.75, 2.0])
    (sent,) = two.sparse["w"].positions.tolist()
    assert sent in (0, 3) and two.sparse["w"].values.tolist() == [2.0]
    u[sent], v[sent] = 0.0, 0.0
    assert torch.equal(two.residual.u["w"], u) and torch.equal(two.residual.v["w"], v)


def test_masking_zeroes_sent_positions_and_keeps_the_half_precision_rounding():
    update = _update(3)
    result = dgc.compress(update, PARAMS, Residual(), DgcSettings(0.9, warmup=0, momentum=0.9), 0)
    where = result.sparse["w"].positions
    assert torch.all(result.residual.u["w"].flatten()[where] == 0)
    exact = update["w"].flatten()[where]
    lost = exact - exact.half().float()
    assert torch.equal(result.residual.v["w"].flatten()[where], lost)
    assert lost.abs().max() <= exact.abs().max() * 2**-11
    untouched = torch.ones(1000, dtype=torch.bool)
    untouched[where] = False
    assert torch.equal(
        result.residual.v["w"].flatten()[untouched], update["w"].flatten()[untouched]
    )


def test_values_beyond_half_precision_are_clamped_and_the_rest_kept():
    result = dgc.compress({"w": torch.tensor([1e6, 1.0])}, {"w"}, Residual(), DgcSettings(0.5), 9)
    assert result.sparse["w"].values.tolist() == [65504.0]
    assert result.residual.v["w"].tolist() == [1e6 - 65504.0, 1.0]


def test_clipping_scales_the_parameters_before_accumulating():
    update = {"w": torch.full((4,), 3.0), "running_mean": torch.full((2,), 50.0)}
    settings = DgcSettings(0.5, warmup=0, clip_norm=3.0)
    result = dgc.compress(update, {"w"}, Residual(), settings, 0)
    assert result.norm == pytest.approx(6.0)
    total = _sent(result, "w") + result.residual.v["w"]
    assert torch.allclose(total, torch.full((4,), 1.5))
    assert torch.equal(result.dense["running_mean"], update["running_mean"])


def test_buffers_and_counters_are_sent_dense_and_inputs_left_alone():
    update = _update(1)
    before = {n: t.clone() for n, t in update.items()}
    half = {**update, "h": torch.ones(3, dtype=torch.float16)}
    result = dgc.compress(half, PARAMS | {"h"}, Residual(), DgcSettings(0.99), 9)
    assert sorted(result.sparse) == ["b", "w"]
    assert sorted(result.dense) == ["count", "h", "running_mean"]
    assert all(torch.equal(update[n], before[n]) for n in before)


def test_dense_tensors_come_back_in_their_dtypes_statistics_in_half_precision(tmp_path):
    update = {**_update(1), "h": torch.ones(3, dtype=torch.float16)}
    result = dgc.compress(update, PARAMS | {"h"}, Residual(), DgcSettings(0.99), 9)
    meta = tensor_io.update_metadata(3, 2, 384, 3)
    sparse_update.save_sparse_update(tmp_path / "u", result.dense, result.sparse, meta)
    tensors, _ = sparse_update.load_update(tmp_path / "u")
    assert {n: t.dtype for n, t in tensors.items()} == {n: t.dtype for n, t in update.items()}
    assert torch.equal(tensors["count"], update["count"])
    assert torch.equal(tensors["h"], update["h"])
    stats = update["running_mean"]
    assert torch.equal(tensors["running_mean"], stats.half().float())
    assert torch.allclose(tensors["running_mean"], stats, rtol=2**-11, atol=2**-25)


# --- residuals on the execute machine ------------------------------------------------------------


def _reference() -> dict[str, torch.Tensor]:
    return {n: t for n, t in _update(0).items() if n in PARAMS}


def test_residual_round_trip_through_the_machines_cache(tmp_path):
    folder = residual_cache.run_cache(str(tmp_path), RUN_ID)
    settings = DgcSettings(0.99, momentum=0.9)
    result = dgc.compress(_update(0), PARAMS, Residual(jobs=2), settings, 7)
    written = residual_cache.save(folder, result.residual, RUN_ID, 4, 7)
    path = folder / "l004_j0007.safetensors"
    assert written == path.stat().st_size
    assert tensor_io.read_metadata(path) == tensor_io.residual_metadata(RUN_ID, 4, 3, 7)
    found = residual_cache.load(folder, RUN_ID, 4, 8, _reference(), 0.9)
    assert (found.how, found.step, found.bytes, found.residual.jobs) == ("loaded", 7, written, 3)
    for name in PARAMS:
        assert torch.equal(found.residual.u[name], result.residual.u[name])
        assert torch.equal(found.residual.v[name], result.residual.v[name])


def test_a_job_takes_its_lanes_newest_earlier_residual_and_older_ones_go(tmp_path):
    folder = residual_cache.run_cache(str(tmp_path), RUN_ID)
    for step in (0, 1, 2, 4):
        residual = Residual(v={n: torch.full_like(t, step) for n, t in _reference().items()})
        residual_cache.save(folder, residual, RUN_ID, 0, step)
    assert sorted(p.name for p in folder.iterdir()) == [
        "l000_j0002.safetensors",
        "l000_j0004.safetensors",
    ]
    assert residual_cache.load(folder, RUN_ID, 0, 4, _reference(), 0.0).step == 2  # a retry of 4
    assert residual_cache.load(folder, RUN_ID, 0, 9, _reference(), 0.0).step == 4
    assert residual_cache.load(folder, RUN_ID, 1, 9, _reference(), 0.0).how == "none"
    assert residual_cache.load(folder, RUN_ID, 0, 2, _reference(), 0.0).how == "none"


def test_runs_are_kept_apart_and_the_default_cache_is_not_the_jobs_scratch(tmp_path, monkeypatch):
    monkeypatch.setattr(machine_cache, "DEFAULT_PARENT", tmp_path / "var-tmp")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "scratch"))
    folder = residual_cache.run_cache("", RUN_ID)
    assert folder.parent == tmp_path / "var-tmp" / f"dagtrain-{os.getuid()}" / "residuals"
    assert residual_cache.run_cache("", "run-b") != folder
    assert (folder.parent.stat().st_mode & 0o777) == 0o700


# --- the node's step -----------------------------------------------------------------------------


def _smallcnn_update(seed: int, classes: int = 10):
    model = build_model("smallcnn", classes, 3, seed=0)
    params = {name for name, _ in model.named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    update = {
        n: torch.randn(t.shape, generator=gen) * 0.01 if t.is_floating_point() else t + 20
        for n, t in model.state_dict().items()
    }
    return model.state_dict(), params, update


def test_write_update_keeps_the_residual_on_the_machine_and_the_update_validates(tmp_path):
    state, params, update = _smallcnn_update(1)
    meta = tensor_io.update_metadata(3, 2, 384, 3)
    config = _config(tmp_path / "cache", sparsity=0.999, warmup=4)
    folder = residual_cache.run_cache(config.data.node_cache, RUN_ID)
    earlier = Residual(v={n: torch.zeros_like(state[n]) for n in params}, jobs=1)
    residual_cache.save(folder, earlier, RUN_ID, 2, 2)
    job = tmp_path / "job"
    job.mkdir()
    metrics, on_machine = write_update(update, params, config, meta, 2, 3, job / "update.s")
    assert metrics["residual"] == "loaded" and metrics["residual_jobs"] == 2
    assert metrics["sparsity"] == pytest.approx(0.9960, abs=1e-4)  # step 3 of the warm-up
    assert metrics["update_bytes"] == (job / "update.s").stat().st_size
    assert 0.003 < metrics["kept_fraction"] < 0.006
    assert sorted(p.name for p in job.iterdir()) == ["update.s"]
    kept = folder / "l002_j0003.safetensors"
    assert on_machine.residual_out == kept.stat().st_size
    assert on_machine.residual_in == (folder / "l002_j0002.safetensors").stat().st_size
    check = validate_update(job / "update.s", state, 3, 2, 1000.0, plan=JobPlan(384, 20))
    assert check.ok, check.reason


@pytest.mark.parametrize(("sparsity", "at_least"), [(0.999, 200), (0.99, 100)])
def test_sparse_smallcnn_update_is_much_smaller_than_dense(tmp_path, sparsity, at_least):
    _, params, update = _smallcnn_update(2, classes=6)
    meta = tensor_io.update_metadata(3, 2, 384, 3)
    tensor_io.save_tensors(tmp_path / "dense", update, meta)
    settings = DgcSettings(sparsity, warmup=0)
    result = dgc.compress(update, params, Residual(), settings, 0)
    sparse_update.save_sparse_update(tmp_path / "sparse", result.dense, result.sparse, meta)
    ratio = (tmp_path / "dense").stat().st_size / (tmp_path / "sparse").stat().st_size
    assert ratio >= at_least


# --- the node job --------------------------------------------------------------------------------


class _Local:
    def __init__(self, n: int) -> None:
        gen = torch.Generator().manual_seed(n)
        self.x = torch.rand(n, 3, 16, 16, generator=gen)
        self.y = torch.arange(n) % 4


def _node_task(tmp_path, monkeypatch, method: str) -> node_job.NodeTask:
    """A node job whose data fetch is replaced by random images (the wiring is under test)."""
    raw = {
        "run": {"run_id": RUN_ID, "rounds": 3},
        "data": {
            "dataset": "ds",
            "mirrors": ["ftp://127.0.0.1:1/ds"],
            "local_train": 32,
            "node_cache": str(tmp_path / "cache"),
        },
        "model": {"image_size": 16},
        "train": {"local_steps": 2, "batch_size": 8, "augment": False},
        "compression": {"method": method, "sparsity": 0.99, "warmup": 4},
    }
    (tmp_path / "config.toml").write_text(to_toml(config.from_dict(raw).config))
    model_file.save_model(
        tmp_path / "global.safetensors",
        build_model("smallcnn", 4, 3, seed=0),
        tensor_io.model_metadata(1, "smallcnn", 4, 3, 16),
    )
    monkeypatch.setattr(node_job, "planned_manifest", lambda *args: None)
    monkeypatch.setattr(node_job, "local_sets", lambda *args: ([1, 2], [3]))
    monkeypatch.setattr(node_job, "sources_per_class", lambda *args: {"min": 1, "mean": 1.0})
    monkeypatch.setattr(node_job, "load_fragments", lambda m, ids, *rest: _Local(16 * len(ids)))
    out = tmp_path / "out"
    return node_job.NodeTask(
        tmp_path / "config.toml",
        tmp_path / "global.safetensors",
        1,
        2,
        0,
        out,
    )


def test_node_job_with_dgc_writes_a_sparse_update_and_keeps_the_residual(tmp_path, monkeypatch):
    task = _node_task(tmp_path, monkeypatch, "dgc")
    first = node_job.run_node(task)
    assert first["residual"] == "none" and first["sparsity"] == dgc.sparsity_at(1, 0.99, 4)
    assert sorted(p.name for p in task.out_dir.iterdir()) == ["metrics.json", "update.safetensors"]
    model, _ = model_file.load_model(tmp_path / "global.safetensors")
    plan = JobPlan.from_config(read_run_config(task.config_path))
    check = validate_update(
        task.out_dir / "update.safetensors", model.state_dict(), 1, 2, 1e3, plan=plan
    )
    assert check.ok, check.reason
    second = node_job.run_node(dataclasses.replace(task, round_=2))
    assert second["residual"] == "loaded" and second["residual_step"] == 1
    assert second["sparsity"] == dgc.sparsity_at(2, 0.99, 4)
    assert second["update_bytes"] == (task.out_dir / "update.safetensors").stat().st_size
    assert json.loads((task.out_dir / "metrics.json").read_text()) == second
    assert 0.04 < second["kept_fraction"] < 0.06
    moved = second["bytes"]
    assert moved["through_submit_host"]["update_out"] == second["update_bytes"]
    assert moved["through_submit_host"]["model_in"] == task.model_path.stat().st_size
    assert moved["through_submit_host"]["residual_in"] == 0
    assert moved["through_submit_host"]["residual_out"] == 0
    assert moved["on_machine"]["residual_in"] > 100_000
    assert moved["from_mirrors"]["data_in"] == 0  # the fetch is replaced here


def test_a_lane_job_on_another_machine_starts_from_zero(tmp_path, monkeypatch):
    task = _node_task(tmp_path, monkeypatch, "dgc")
    node_job.run_node(task)
    elsewhere = read_run_config(task.config_path).with_values(
        "data", node_cache=str(tmp_path / "other-machine")
    )
    (tmp_path / "config.toml").write_text(to_toml(elsewhere))
    second = node_job.run_node(dataclasses.replace(task, round_=2))
    assert second["residual"] == "none" and second["residual_jobs"] == 1
    assert second["sparsity"] == dgc.sparsity_at(2, 0.99, 4)  # no second warm-up
    assert second["bytes"]["on_machine"]["residual_in"] == 0


def test_node_job_without_compression_writes_a_dense_update_only(tmp_path, monkeypatch):
    task = _node_task(tmp_path, monkeypatch, "none")
    metrics = node_job.run_node(task)
    assert "residual" not in metrics and metrics["bytes"]["on_machine"]["residual_out"] == 0
    assert sorted(p.name for p in task.out_dir.iterdir()) == ["metrics.json", "update.safetensors"]
    assert "compression" not in tensor_io.read_metadata(task.out_dir / "update.safetensors")
    assert not (tmp_path / "cache").exists()
