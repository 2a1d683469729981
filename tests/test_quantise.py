"""fp16 and int8 updates: every value sent in fewer bits, what rounding loses kept in the lane's
residual, and the files the aggregation validates and reads back as float32."""

import pytest
import torch

from aggregation.job_plan import JobPlan
from aggregation.validate import validate_update
from node_payload.common import quantised_update, sparse_update, tensor_io
from node_payload.common.errors import UserError
from node_payload.common.models import build_model
from node_payload.common.run_config import CompressionTable, RunConfig
from node_payload.compression import METHODS, write_update
from node_payload.quantise import quantise
from node_payload.residual_cache import Residual
from pipeline import config as config_mod

PARAMS = {"w", "b"}


def _update(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(40, 25, generator=gen) * 0.01,
        "b": torch.randn(7, generator=gen) * 0.01,
        "running_mean": torch.randn(7, generator=gen),
        "count": torch.tensor(12 + seed),
    }


def _sent(encoded, name: str) -> torch.Tensor:
    tensor = encoded.tensors[name]
    if tensor.dtype == torch.int8:
        return quantised_update.from_int8(tensor, encoded.tensors[name + "::scale"])
    return tensor.float()


@pytest.mark.parametrize(("method", "step"), [("fp16", 2**-11), ("int8", 1 / 254)])
def test_rounding_is_fed_back_so_sent_plus_residual_is_the_sum(method, step):
    first_error = quantise(_update(0), PARAMS, Residual(), 0.0, method).residual.v["w"]
    residual, sent, inputs = Residual(), torch.zeros(40, 25), torch.zeros(40, 25)
    for seed in range(6):
        update = _update(seed)
        encoded = quantise(update, PARAMS, residual, 0.0, method)
        sent += _sent(encoded, "w")
        inputs += update["w"]
        residual = encoded.residual
    assert torch.allclose(sent + residual.v["w"], inputs, atol=1e-6)
    assert residual.jobs == 6 and residual.u == {}
    largest = _update(0)["w"].abs().max()
    assert 0 < first_error.abs().max() <= largest * step * 1.01


def test_int8_sends_a_tensor_as_q_times_its_scale():
    encoded = quantise({"w": torch.tensor([0.5, -1.27, 0.0])}, {"w"}, Residual(), 0.0, "int8")
    assert encoded.tensors["w"].tolist() == [50, -127, 0]
    assert encoded.tensors["w::scale"].item() == pytest.approx(0.01)
    zeros = quantise({"w": torch.zeros(3)}, {"w"}, Residual(), 0.0, "int8")
    assert zeros.tensors["w"].tolist() == [0, 0, 0] and zeros.tensors["w::scale"].item() == 0


def test_statistics_go_in_half_precision_and_counters_as_they_are():
    update = _update(1)
    for method in ("fp16", "int8"):
        encoded = quantise(update, PARAMS, Residual(), 0.0, method)
        assert encoded.tensors["running_mean"].dtype == torch.float16
        assert torch.equal(encoded.tensors["count"], update["count"])
        assert sorted(encoded.residual.v) == ["b", "w"]
        assert encoded.metadata == {"compression": method}


def test_clip_norm_scales_the_parameters_first():
    update = {"w": torch.full((4,), 3.0), "running_mean": torch.full((2,), 50.0)}
    encoded = quantise(update, {"w"}, Residual(), 3.0, "fp16")
    assert encoded.metrics["update_norm_before_clip"] == pytest.approx(6.0)
    assert torch.allclose(_sent(encoded, "w") + encoded.residual.v["w"], torch.full((4,), 1.5))


@pytest.mark.parametrize(("method", "smaller"), [("fp16", 1.9), ("int8", 3.5)])
def test_smallcnn_updates_validate_and_read_back_close_to_dense(tmp_path, method, smaller):
    model = build_model("smallcnn", 6, 3, seed=0)
    state = model.state_dict()
    params = {name for name, _ in model.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    update = {
        n: torch.randn(t.shape, generator=gen) * 0.01 if t.is_floating_point() else t + 20
        for n, t in state.items()
    }
    config = RunConfig().with_values("run", run_id="run-q")
    config = config.with_values("data", node_cache=str(tmp_path / "cache"))
    config = config.with_values("compression", method=method)
    meta = tensor_io.update_metadata(3, 2, 384, 3)
    tensor_io.save_tensors(tmp_path / "dense", update, meta)
    metrics, on_machine = write_update(update, params, config, meta, 2, 3, tmp_path / "q")
    assert metrics["residual"] == "none" and on_machine.residual_out > 0
    assert (tmp_path / "dense").stat().st_size / metrics["update_bytes"] >= smaller
    check = validate_update(tmp_path / "q", state, 3, 2, 1e3, plan=JobPlan(384, 20))
    assert check.ok, check.reason
    tensors, _ = sparse_update.load_update(tmp_path / "q")
    assert {n: t.dtype for n, t in tensors.items()} == {n: t.dtype for n, t in update.items()}
    for name in params:
        tolerance = update[name].abs().max() / (127 if method == "int8" else 1000)
        assert torch.allclose(tensors[name], update[name], atol=float(tolerance)), name


def test_the_methods_are_registered_and_the_config_names_them():
    assert list(METHODS) == ["none", "dgc", "fp16", "int8"]
    raw = {"data": {"dataset": "ds"}, "compression": {"method": "int8"}}
    assert config_mod.from_dict(raw).config.compressed
    with pytest.raises(UserError, match='one of "none", "dgc", "fp16", "int8"'):
        config_mod.from_dict({"data": {"dataset": "ds"}, "compression": {"method": "int4"}})
    assert CompressionTable().method == "none" and not RunConfig().compressed
