import numpy as np
import pytest
import torch
from torch import nn

from aggregation.job_plan import JobPlan
from aggregation.merge import merge_updates
from aggregation.validate import validate_update
from node_payload.common import sparse_update, tensor_io
from node_payload.common.sparse_update import SparseTensor

ROUND = 2
BOUND = 1000.0
PLAN = JobPlan(samples=100, steps=10)


class Tiny(nn.Module):
    """Every kind of tensor a real model has: parameters, BatchNorm statistics, a counter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)


@pytest.fixture
def global_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in Tiny().state_dict().items()}


SPARSE = ("conv.weight", "bn.weight", "bn.bias", "fc.weight", "fc.bias")


def _parts(global_state, seed: int, kept: int = 3):
    """A sparse update like a node's: a few values of each parameter, buffers dense."""
    gen = torch.Generator().manual_seed(seed)
    sparse = {}
    for name in SPARSE:
        shape = tuple(global_state[name].shape)
        numel = global_state[name].numel()
        positions = torch.randperm(numel, generator=gen)[:kept].sort().values
        values = (torch.randn(kept, generator=gen) * 0.1).half()
        sparse[name] = SparseTensor(shape, positions, values)
    dense = {
        name: (torch.randn(t.shape, generator=gen) * 0.1).half().float()
        if t.is_floating_point()
        else t + seed
        for name, t in global_state.items()
        if name not in SPARSE
    }
    return dense, sparse


def _meta(node: int, samples: int = 100) -> dict[str, str]:
    return tensor_io.update_metadata(ROUND, node, samples, ROUND)


def _write(tmp_path, node, dense, sparse, samples=100):
    path = tmp_path / f"s{node}.safetensors"
    sparse_update.save_sparse_update(path, dense, sparse, _meta(node, samples))
    return path


def _densified(global_state, dense, sparse):
    out = {}
    for name, ref in global_state.items():
        if name in sparse:
            flat = torch.zeros(ref.numel())
            flat[sparse[name].positions] = sparse[name].values.float()
            out[name] = flat.reshape(ref.shape)
        else:
            out[name] = dense[name]
    return out


# --- index coding --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "positions",
    [[], [0], [0, 1, 2], [127, 128, 16383, 16384, 2**21, 2**28 + 5], [5, 1000, 1001, 2**31 - 1]],
)
def test_gap_coding_round_trips(positions):
    array = np.array(positions, dtype=np.int64)
    assert sparse_update.decode_gaps(sparse_update.encode_gaps(array)).tolist() == positions


def test_small_gaps_take_one_byte_and_large_ones_more():
    assert len(sparse_update.encode_gaps(np.arange(0, 1270, 10))) == 127
    assert len(sparse_update.encode_gaps(np.array([200, 400]))) == 4


# --- round trip ----------------------------------------------------------------------------------


def test_sparse_round_trip_is_exact(tmp_path, global_state):
    dense, sparse = _parts(global_state, 1)
    path = _write(tmp_path, 0, dense, sparse)
    tensors, meta = sparse_update.load_update(path)
    expected = _densified(global_state, dense, sparse)
    assert sorted(tensors) == sorted(global_state)
    for name, tensor in expected.items():
        assert tensors[name].dtype == tensor.dtype and torch.equal(tensors[name], tensor), name
    assert meta["compression"] == "dgc" and meta["samples"] == "100"
    layout = sparse_update.decode_layout(meta["layout"])
    assert [name for name, _ in layout["sparse"]] == list(SPARSE)
    assert [name for name, _ in layout["i64"]] == ["bn.num_batches_tracked"]


def test_statistics_travel_in_half_precision(tmp_path, global_state):
    """Running means and variances lose what float16 rounds off (relative 2^-11), stay
    positive and finite, and beyond float16's range are clamped."""
    dense, sparse = _parts(global_state, 1)
    var = torch.tensor([1e-4, 0.3, 1.7, 25.0, 4e3, 1e5, 2e-5, 1.0])
    dense["bn.running_var"], dense["bn.running_mean"] = var, -var
    tensors, _ = sparse_update.load_update(_write(tmp_path, 0, dense, sparse))
    got = tensors["bn.running_var"]
    assert got.dtype == torch.float32 and (got > 0).all() and torch.isfinite(got).all()
    assert torch.allclose(got[:5], var[:5], rtol=2**-11, atol=0)
    assert got[5] == sparse_update.MAX_HALF and torch.equal(tensors["bn.running_mean"], -got)


def test_dense_files_read_as_before(tmp_path, global_state):
    path = tmp_path / "dense.safetensors"
    tensor_io.save_tensors(path, global_state, _meta(0))
    tensors, _ = sparse_update.load_update(path)
    assert all(torch.equal(tensors[n], t) for n, t in global_state.items())


def test_a_tensor_with_nothing_sent_is_zeros(tmp_path, global_state):
    dense, sparse = _parts(global_state, 1)
    empty = torch.zeros(0, dtype=torch.int64)
    sparse["fc.bias"] = SparseTensor((5,), empty, torch.zeros(0, dtype=torch.float16))
    tensors, _ = sparse_update.load_update(_write(tmp_path, 0, dense, sparse))
    assert torch.equal(tensors["fc.bias"], torch.zeros(5))


# --- validation ----------------------------------------------------------------------------------


def test_valid_sparse_update_is_accepted_with_the_norm_of_its_values(tmp_path, global_state):
    dense, sparse = _parts(global_state, 1)
    check = validate_update(
        _write(tmp_path, 0, dense, sparse), global_state, ROUND, 0, BOUND, plan=PLAN
    )
    floats = [t for t in _densified(global_state, dense, sparse).values() if t.is_floating_point()]
    norm = torch.linalg.vector_norm(torch.cat([t.flatten() for t in floats]).double()).item()
    assert check.ok and check.samples == 100
    assert check.norm == pytest.approx(norm, rel=1e-12)


# --- merging -------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["mean", "median", "trimmed_mean"])
def test_sparse_updates_merge_like_their_dense_equivalents(tmp_path, global_state, rule):
    sparse_paths, dense_paths = [], []
    for node in range(5):
        dense, sparse = _parts(global_state, node, kept=4)
        sparse_paths.append((node, _write(tmp_path, node, dense, sparse, 50 + node)))
        path = tmp_path / f"d{node}.safetensors"
        tensor_io.save_tensors(
            path, _densified(global_state, dense, sparse), _meta(node, 50 + node)
        )
        dense_paths.append((node, path))
    from_sparse = merge_updates(
        global_state, sparse_paths, BOUND, ROUND, rule, clip_norm=0.5, plan=PLAN
    )
    from_dense = merge_updates(
        global_state, dense_paths, BOUND, ROUND, rule, clip_norm=0.5, plan=PLAN
    )
    assert from_sparse.accepted == from_dense.accepted == [0, 1, 2, 3, 4]
    assert from_sparse.clipped == from_dense.clipped
    for name, tensor in from_dense.mean_update.items():
        assert torch.equal(from_sparse.mean_update[name], tensor), name


def test_sparse_and_dense_updates_merge_together(tmp_path, global_state):
    dense, sparse = _parts(global_state, 1)
    plain = tmp_path / "plain.safetensors"
    tensor_io.save_tensors(plain, _densified(global_state, dense, sparse), _meta(1))
    merged = merge_updates(
        global_state, [(0, _write(tmp_path, 0, dense, sparse)), (1, plain)], BOUND, ROUND, plan=PLAN
    )
    assert merged.accepted == [0, 1]
    expected = _densified(global_state, dense, sparse)
    assert torch.allclose(merged.mean_update["fc.weight"], expected["fc.weight"])
