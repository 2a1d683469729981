import math
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from aggregation.job_plan import JobPlan
from aggregation.merge import merge_updates
from aggregation.quorum import QuorumNotMet, required_updates
from aggregation.server_optimizer import ServerOptimizer
from aggregation.validate import validate_update
from node_payload import dgc
from node_payload.common import sparse_update, tensor_io
from node_payload.common.errors import UserError
from node_payload.common.run_config import ServerTable
from node_payload.residual_cache import Residual

ROUND = 3
BOUND = 100.0
PLAN = JobPlan(samples=480, steps=10)


class Tiny(nn.Module):
    """Has every kind of tensor a real model has: parameters, float buffers, an int counter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 6)


@pytest.fixture
def model() -> Tiny:
    torch.manual_seed(0)
    return Tiny()


@pytest.fixture
def global_state(model) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["bn.running_var"] += 0.5
    state["bn.num_batches_tracked"] += 40
    return state


@pytest.fixture
def param_names(model) -> set[str]:
    return {name for name, _ in model.named_parameters()}


def _delta(global_state, seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(t.shape, generator=gen) * scale
        if t.is_floating_point()
        else t + seed  # integer tensors hold the local counter
        for name, t in global_state.items()
    }


def _write(directory: Path, node: int, tensors, samples=100, meta=None) -> Path:
    path = directory / f"n{node:03d}.safetensors"
    metadata = tensor_io.update_metadata(ROUND, node, samples, ROUND) | (meta or {})
    tensor_io.save_tensors(path, tensors, metadata)
    return path


def _np(tensors) -> dict[str, np.ndarray]:
    return {name: t.numpy() for name, t in tensors.items()}


# --- weighted mean -------------------------------------------------------------------------------


def test_weighted_mean_matches_numpy(tmp_path, global_state):
    samples = [10, 30, 7]
    deltas = [_delta(global_state, seed) for seed in (1, 2, 3)]
    paths = [
        _write(tmp_path, n, d, s) for n, (d, s) in enumerate(zip(deltas, samples, strict=True))
    ]
    result = merge_updates(global_state, enumerate(paths), BOUND, ROUND, plan=PLAN)

    assert result.accepted == [0, 1, 2] and result.rejected == {}
    assert result.samples == 47
    for name, ref in global_state.items():
        arrays = [_np(d)[name] for d in deltas]
        if ref.is_floating_point():
            total = sum(a.astype(np.float64) * w for a, w in zip(arrays, samples, strict=True))
            expected = (total / sum(samples)).astype(np.float32)
        else:
            expected = np.maximum.reduce(arrays)
        np.testing.assert_array_equal(result.mean_update[name].numpy(), expected)
        assert result.mean_update[name].dtype == ref.dtype


def test_merge_is_bit_reproducible(tmp_path, global_state):
    paths = [_write(tmp_path, n, _delta(global_state, n), 17 + n) for n in range(4)]
    first = merge_updates(global_state, enumerate(paths), BOUND, ROUND, plan=PLAN).mean_update
    second = merge_updates(global_state, enumerate(paths), BOUND, ROUND, plan=PLAN).mean_update
    for name in global_state:
        assert torch.equal(first[name], second[name])


def test_validation_reports_norm_and_samples(tmp_path, global_state):
    delta = _delta(global_state, 5)
    path = _write(tmp_path, 2, delta, samples=480)
    check = validate_update(path, global_state, ROUND, 2, BOUND, plan=PLAN)
    floats = [t.double() for t in delta.values() if t.is_floating_point()]
    assert check.ok and check.samples == 480
    assert check.norm == pytest.approx(math.sqrt(sum(float((t**2).sum()) for t in floats)))


def test_nothing_accepted_gives_an_empty_mean(tmp_path, global_state):
    path = _write(tmp_path, 0, _delta(global_state, 1), meta={"round": "1"})
    result = merge_updates(global_state, [(0, path)], BOUND, ROUND, plan=PLAN)
    assert result.accepted == [] and list(result.rejected) == [0]
    assert result.mean_update == {} and result.samples == 0


# --- streaming -----------------------------------------------------------------------------------


def _write_sparse(directory: Path, node: int, tensors, params: set[str], samples=100) -> Path:
    path = directory / f"n{node:03d}.safetensors"
    metadata = tensor_io.update_metadata(ROUND, node, samples, ROUND)
    result = dgc.compress(tensors, params, Residual(), dgc.DgcSettings(0.9, warmup=0), 0)
    sparse_update.save_sparse_update(path, result.dense, result.sparse, metadata)
    return path


@pytest.mark.parametrize("sparse", [False, True])
def test_merge_streams_one_update_and_one_tensor_at_a_time(
    tmp_path, global_state, param_names, monkeypatch, sparse
):
    paths = [
        _write_sparse(tmp_path, n, _delta(global_state, n), param_names, 10 + n)
        if sparse
        else _write(tmp_path, n, _delta(global_state, n), 10 + n)
        for n in range(5)
    ]
    open_files: list[Path] = []
    live = weakref.WeakSet()
    most_live = 0
    real_open = tensor_io.open_lazy

    class CountingLazy:
        def __init__(self, lazy):
            self._lazy = lazy
            self.names = lazy.names
            self.metadata = lazy.metadata

        def get(self, name):
            nonlocal most_live
            most_live = max(most_live, len(live))
            tensor = self._lazy.get(name)
            if not name.startswith("::"):  # a sparse file's values: O(kept), held while open
                live.add(tensor)
            return tensor

    class CountingOpen:
        def __init__(self, path):
            self._cm = real_open(path)
            self._path = path

        def __enter__(self):
            assert open_files == [], "a second update was opened while one is open"
            open_files.append(self._path)
            return CountingLazy(self._cm.__enter__())

        def __exit__(self, *exc):
            open_files.remove(self._path)
            return self._cm.__exit__(*exc)

    def node_order():
        for node, path in enumerate(paths):
            assert open_files == [], "the next path was pulled before the last file was closed"
            yield node, path

    monkeypatch.setattr(tensor_io, "open_lazy", CountingOpen)
    result = merge_updates(global_state, node_order(), BOUND, ROUND, plan=PLAN)
    assert result.accepted == [0, 1, 2, 3, 4]
    assert most_live <= 1


# --- server optimizer ----------------------------------------------------------------------------


def test_lr_one_without_momentum_is_plain_averaging(tmp_path, global_state, param_names):
    paths = [_write(tmp_path, n, _delta(global_state, n), 5 * n + 1) for n in range(3)]
    merged = merge_updates(global_state, enumerate(paths), BOUND, ROUND, plan=PLAN).mean_update
    new = ServerOptimizer("sgd", lr=1.0).step(global_state, merged, param_names)
    for name, value in global_state.items():
        expected = value - merged[name] if value.is_floating_point() else merged[name]
        assert torch.equal(new[name], expected)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_matches_hand_computation_over_three_rounds(global_state, param_names, nesterov):
    lr, mu = 0.5, 0.9
    opt = ServerOptimizer("sgd", lr=lr, momentum=mu, nesterov=nesterov)
    state = global_state
    expected = _np({k: v.clone() for k, v in global_state.items()})
    velocity = {name: np.zeros_like(expected[name]) for name in param_names}
    for round_ in range(3):
        delta = _delta(global_state, round_)
        state = opt.step(state, delta, param_names)
        for name, d in _np(delta).items():
            if name in param_names:
                velocity[name] = velocity[name] * np.float32(mu) + d
                step = d + velocity[name] * np.float32(mu) if nesterov else velocity[name]
                expected[name] = expected[name] - step * np.float32(lr)
            elif d.dtype.kind == "f":  # BatchNorm running statistics: plain averaging
                expected[name] = expected[name] - d
            else:
                expected[name] = d
        for name, value in state.items():
            np.testing.assert_array_equal(value.numpy(), expected[name])


def test_adam_matches_hand_computation_over_three_rounds(global_state, param_names):
    lr, b1, b2, eps = 0.01, 0.9, 0.99, 1e-3
    opt = ServerOptimizer("adam", lr=lr, beta1=b1, beta2=b2, eps=eps)
    state = global_state
    expected = _np({k: v.clone() for k, v in global_state.items()})
    m = {name: np.zeros_like(expected[name]) for name in param_names}
    v = {name: np.zeros_like(expected[name]) for name in param_names}
    f32 = np.float32
    for round_ in range(3):
        delta = _delta(global_state, round_)
        state = opt.step(state, delta, param_names)
        for name, d in _np(delta).items():
            if name in param_names:
                m[name] = m[name] * f32(b1) + d * f32(1 - b1)
                v[name] = v[name] * f32(b2) + d * d * f32(1 - b2)
                m_hat = m[name] / f32(1 - b1 ** (round_ + 1))
                v_hat = v[name] / f32(1 - b2 ** (round_ + 1))
                step = m_hat / (np.sqrt(v_hat) + f32(eps))
                expected[name] = expected[name] - step * f32(lr)
            elif d.dtype.kind == "f":
                expected[name] = expected[name] - d
            else:
                expected[name] = d
        for name, value in state.items():
            np.testing.assert_allclose(value.numpy(), expected[name], rtol=1e-6, atol=1e-7)
    assert opt.steps == 3


SERVER_SETTINGS = [
    {"kind": "sgd", "lr": 0.7, "momentum": 0.9, "nesterov": True},
    {"kind": "sgd", "lr": 0.7, "momentum": 0.9},
    {"kind": "adam", "lr": 0.01, "beta1": 0.8, "beta2": 0.95, "eps": 1e-4},
]


@pytest.mark.parametrize("settings", SERVER_SETTINGS)
def test_resumed_server_state_continues_exactly(tmp_path, global_state, param_names, settings):
    def run(opt, state, rounds):
        for round_ in rounds:
            state = opt.step(state, _delta(global_state, round_), param_names)
        return state

    continuous = run(ServerOptimizer(**settings), global_state, range(3))

    first = ServerOptimizer(**settings)
    state = run(first, global_state, range(2))
    path = tmp_path / "server_r002.safetensors"
    buffers, _ = first.state_dict()
    assert buffers, "momentum and Adam keep state that a resumed run needs"
    tensor_io.save_tensors(path, *first.state_dict())
    resumed = ServerOptimizer(**settings)
    resumed.load_state_dict(*tensor_io.load_tensors(path))
    assert resumed.steps == 2
    state = run(resumed, state, [2])

    for name in global_state:
        assert torch.equal(state[name], continuous[name])


def test_server_state_without_momentum_is_empty_but_loadable(tmp_path):
    path = tmp_path / "server_r000.safetensors"
    tensor_io.save_tensors(path, *ServerOptimizer("sgd", 1.0).state_dict())
    opt = ServerOptimizer("sgd", 1.0)
    opt.load_state_dict(*tensor_io.load_tensors(path))
    assert opt.steps == 0 and opt.state_dict()[0] == {}


def test_wrong_server_state_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a 'sgd' server state"):
        ServerOptimizer("sgd", 1.0).load_state_dict({}, tensor_io.update_metadata(0, 0, 1, 0))
    sgd_state = ServerOptimizer("sgd", 1.0, 0.9).state_dict()
    with pytest.raises(ValueError, match="not a 'adam' server state"):
        ServerOptimizer("adam", 0.01).load_state_dict(*sgd_state)


def test_server_optimizer_from_config_reads_every_key():
    server = ServerTable(optimizer="adam", lr=0.02, beta1=0.5, beta2=0.9, eps=1e-6)
    opt = ServerOptimizer.from_config(server)
    assert (opt.kind, opt.lr, opt.beta1, opt.beta2, opt.eps) == ("adam", 0.02, 0.5, 0.9, 1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "adagrad", "lr": 1.0},
        {"kind": "adam", "lr": 0.01, "momentum": 0.9},
        {"kind": "adam", "lr": 0.01, "beta2": 1.0},
        {"kind": "adam", "lr": 0.01, "eps": 0.0},
        {"kind": "sgd", "lr": 0.0},
        {"kind": "sgd", "lr": 1.0, "momentum": 1.0},
        {"kind": "sgd", "lr": 1.0, "nesterov": True},
    ],
)
def test_bad_server_settings_are_user_errors(kwargs):
    with pytest.raises(UserError):
        ServerOptimizer(**kwargs)


# --- quorum --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "quorum", "required"),
    [
        (5, 0.8, 4),
        (10, 0.7, 7),
        (5, 0.2, 1),
        (10, 0.3, 3),
        (3, 0.6, 2),
        (7, 0.5, 4),
        (4, 1.0, 4),
        (1, 1.0, 1),
        (1000, 1e-9, 1),
        (3, 1 / 3, 1),
    ],
)
def test_required_updates(nodes, quorum, required):
    assert required_updates(nodes, quorum) == required


@pytest.mark.parametrize(
    ("nodes", "quorum"), [(5, 0.0), (5, 1.01), (5, -0.5), (5, math.nan), (0, 1)]
)
def test_impossible_quorum_is_a_user_error(nodes, quorum):
    with pytest.raises(UserError):
        required_updates(nodes, quorum)


def test_quorum_not_met_explains_what_to_do():
    err = QuorumNotMet(4, 2, 4, missing=[1, 3], rejected={2: "tensor 'fc.weight' contains NaN"})
    message = str(err)
    assert "round 4" in message and "only 2 valid" in message and "needs 4" in message
    assert "missing nodes: 1, 3" in message
    assert "node 2: tensor 'fc.weight' contains NaN" in message
    assert "rescue DAG" in message and "rounds/r004" in message


def _rates(opt: ServerOptimizer, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(opt.current_lr())
        opt.steps += 1
    return rates


def test_server_lr_warms_up_then_decays_to_zero() -> None:
    assert _rates(ServerOptimizer("sgd", lr=0.6, warmup=3), 5) == pytest.approx(
        [0.2, 0.4, 0.6, 0.6, 0.6]
    )
    rates = _rates(ServerOptimizer("sgd", lr=0.6, warmup=3, decay_steps=10), 11)
    assert rates[2:] == sorted(rates[2:], reverse=True)
    assert rates[10] == 0.0  # past the decay: a late, stale update moves the model no more


def test_warmup_scales_the_first_server_step(global_state, param_names) -> None:
    delta = _delta(global_state, 0)
    plain = ServerOptimizer("sgd", lr=1.0).step(global_state, delta, param_names)
    warm = ServerOptimizer("sgd", lr=1.0, warmup=4).step(global_state, delta, param_names)
    for name in param_names:
        moved = global_state[name] - warm[name]
        torch.testing.assert_close(moved, (global_state[name] - plain[name]) / 4)
