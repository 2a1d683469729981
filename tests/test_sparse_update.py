import zlib

import numpy as np
import pytest
import torch
from torch import nn

from aggregation.merge import merge_updates
from aggregation.validate import validate_update
from node_payload import sparse_update, tensor_io
from node_payload.sparse_update import DATA, SparseTensor

ROUND = 2
BOUND = 1000.0


class Tiny(nn.Module):
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


def _rewrite(path, change) -> None:
    """Edit a sparse file's tensors or metadata, to play a broken or hostile node."""
    tensors, meta = tensor_io.load_tensors(path)
    change(tensors, meta)
    tensor_io.save_tensors(path, tensors, meta)


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
    check = validate_update(_write(tmp_path, 0, dense, sparse), global_state, ROUND, 0, BOUND)
    floats = [t for t in _densified(global_state, dense, sparse).values() if t.is_floating_point()]
    norm = torch.linalg.vector_norm(torch.cat([t.flatten() for t in floats]).double()).item()
    assert check.ok and check.samples == 100
    assert check.norm == pytest.approx(norm, rel=1e-12)


def _unpack(tensors, meta):
    """A sparse file's parts: layout, index varints, values, statistics, counters."""
    layout = sparse_update.decode_layout(meta["layout"])
    raw = zlib.decompress(tensors[DATA].numpy().tobytes())
    cut = layout["idx"] + 2 * layout["sent"]
    stats_bytes = 2 * sum(int(np.prod(shape)) for _, shape in layout["f16"])
    halves = sparse_update._from_high_then_low
    return {
        "layout": layout,
        "index": np.frombuffer(raw[: layout["idx"]], dtype=np.uint8).copy(),
        "values": halves(raw[layout["idx"] : cut]).copy(),
        "stats": halves(raw[cut : cut + stats_bytes]).copy(),
        "counters": np.frombuffer(raw[cut + stats_bytes :], dtype="<i8").copy(),
    }


def _repack(tensors, meta, parts) -> None:
    parts["layout"]["idx"], parts["layout"]["sent"] = len(parts["index"]), len(parts["values"])
    meta["layout"] = sparse_update.encode_layout(parts["layout"])
    tensors[DATA] = sparse_update.pack(
        parts["index"], parts["values"], parts["stats"], parts["counters"]
    )


def _edit(edit):
    """A change of the packed parts, kept consistent with the layout's counts."""

    def change(tensors, meta):
        parts = _unpack(tensors, meta)
        edit(parts)
        _repack(tensors, meta, parts)

    return change


def _set_idx(positions):
    def edit(parts):
        parts["index"] = sparse_update.encode_gaps(np.array(positions))
        parts["values"] = np.ones(len(positions), dtype=np.float16)

    return _edit(edit)


def _total(global_state) -> int:
    return sum(global_state[n].numel() for n in SPARSE)


def _out_of_range(global_state):
    return _set_idx([0, _total(global_state)])


@_edit
def _duplicate(parts):
    parts["index"] = np.array([3, 0, 4], dtype=np.uint8)  # positions 3, 3, 7
    parts["values"] = np.ones(3, dtype=np.float16)


@_edit
def _wrong_shape(parts):
    parts["layout"]["sparse"][3][1] = [8, 5]


@_edit
def _wrong_stats_shape(parts):
    parts["layout"]["f16"][0][1] = [4, 2]


@_edit
def _other_model(parts):
    parts["layout"]["f16"][0][0] = "bn2.running_mean"


@_edit
def _nan_value(parts):
    parts["values"][1] = np.nan


@_edit
def _inf_statistic(parts):
    parts["stats"][2] = np.inf


def _not_uint8(tensors, meta):
    tensors[DATA] = tensors[DATA].to(torch.int32)


def _not_zlib(tensors, meta):
    tensors[DATA] = torch.arange(40, dtype=torch.uint8)


def _short_data(tensors, meta):
    layout = sparse_update.decode_layout(meta["layout"])
    layout["sent"] += 1
    meta["layout"] = sparse_update.encode_layout(layout)


def _huge_layout(tensors, meta):
    layout = sparse_update.decode_layout(meta["layout"])
    layout["sent"] = 2**70
    meta["layout"] = sparse_update.encode_layout(layout)


def _long_data(tensors, meta):
    raw = zlib.decompress(tensors[DATA].numpy().tobytes()) + bytes(10**6)
    tensors[DATA] = torch.frombuffer(bytearray(zlib.compress(raw)), dtype=torch.uint8)


@_edit
def _cut_varint(parts):
    parts["index"] = np.array([0x85], dtype=np.uint8)
    parts["values"] = np.ones(1, dtype=np.float16)


@_edit
def _count_mismatch(parts):
    parts["values"] = parts["values"][:-1]


def _no_data(tensors, meta):
    del tensors[DATA]


def _both(tensors, meta):
    tensors["fc.bias"] = torch.zeros(5)


def _bad_layout(tensors, meta):
    meta["layout"] = '{"fc.bias": [5]}'


@_edit
def _named_twice(parts):
    parts["layout"]["i64"].append(["fc.bias", [5]])
    parts["counters"] = np.concatenate([parts["counters"], np.zeros(5, dtype=np.int64)])


def _other_compression(tensors, meta):
    meta["compression"] = "powersgd"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("out_of_range", "is out of range: the sparse tensors hold"),
        (_duplicate, "index 3 appears more than once"),
        (_wrong_shape, "tensor 'fc.weight' has shape (8, 5), expected (5, 8)"),
        (_wrong_stats_shape, "tensor 'bn.running_mean' has shape (4, 2), expected (8,)"),
        (_other_model, "tensor 'bn.running_mean' is missing"),
        (_nan_value, "the sent values contain NaN or Inf"),
        (_inf_statistic, "the statistics sent dense contain NaN or Inf"),
        (_not_uint8, "'::data' is torch.int32"),
        (_not_zlib, "'::data' is not a zlib stream"),
        (_short_data, "'::data' holds"),
        (_huge_layout, "zlib bytes can hold"),
        (_long_data, "'::data' holds more bytes, the layout says"),
        (_cut_varint, "ends in the middle of a number"),
        (_count_mismatch, "indices but"),
        (_no_data, "has no '::data' tensor"),
        (_both, "tensor 'fc.bias' is in the file both packed and by name"),
        (_bad_layout, "metadata layout is not"),
        (_named_twice, "metadata layout names a tensor twice"),
        (_other_compression, "metadata compression is 'powersgd'"),
    ],
)
def test_bad_sparse_updates_are_rejected_with_a_reason(
    tmp_path, global_state, change, reason, capsys
):
    dense, sparse = _parts(global_state, 1)
    bad = _write(tmp_path, 1, dense, sparse)
    _rewrite(bad, _out_of_range(global_state) if change == "out_of_range" else change)
    good = _write(tmp_path, 0, dense, sparse)
    check = validate_update(bad, global_state, ROUND, 1, BOUND)
    assert not check.ok and reason in check.reason, check.reason
    merged = merge_updates(global_state, [(0, good), (1, bad)], BOUND, ROUND)
    assert merged.accepted == [0] and reason in merged.rejected[1]


def test_sparse_tensor_of_a_non_float32_model_tensor_is_rejected(tmp_path, global_state):
    dense, sparse = _parts(global_state, 1)
    path = _write(tmp_path, 0, dense, sparse)
    doubled = {**global_state, "fc.bias": global_state["fc.bias"].double()}
    check = validate_update(path, doubled, ROUND, 0, BOUND)
    assert not check.ok and "is sent sparse (float32), expected torch.float64" in check.reason


def test_norm_bound_applies_to_sparse_values(tmp_path, global_state):
    dense, sparse = _parts(global_state, 1)
    check = validate_update(_write(tmp_path, 0, dense, sparse), global_state, ROUND, 0, 0.01)
    assert not check.ok and "exceeds the bound" in check.reason


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
    from_sparse = merge_updates(global_state, sparse_paths, BOUND, ROUND, rule, clip_norm=0.5)
    from_dense = merge_updates(global_state, dense_paths, BOUND, ROUND, rule, clip_norm=0.5)
    assert from_sparse.accepted == from_dense.accepted == [0, 1, 2, 3, 4]
    assert from_sparse.clipped == from_dense.clipped
    for name, tensor in from_dense.mean_update.items():
        assert torch.equal(from_sparse.mean_update[name], tensor), name


def test_sparse_and_dense_updates_merge_together(tmp_path, global_state):
    dense, sparse = _parts(global_state, 1)
    plain = tmp_path / "plain.safetensors"
    tensor_io.save_tensors(plain, _densified(global_state, dense, sparse), _meta(1))
    merged = merge_updates(
        global_state, [(0, _write(tmp_path, 0, dense, sparse)), (1, plain)], BOUND, ROUND
    )
    assert merged.accepted == [0, 1]
    expected = _densified(global_state, dense, sparse)
    assert torch.allclose(merged.mean_update["fc.weight"], expected["fc.weight"])
