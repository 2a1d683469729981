"""Hostile updates: every way a node's file has been seen to lie, and what the aggregation does.

Nodes run on untrusted volunteer machines, so everything in an update (metadata, tensors, the
file itself) is input to refuse with a reason. Each case asserts its outcome: the rejection and
its reason, or the round (or asynchronous arrival) that fails with a named message while no
model version or server state is written.
"""

import json
import math
import os
import pickle
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from aggregation.async_apply import arrive, flush
from aggregation.async_claim import claim
from aggregation.async_state import read_ledger
from aggregation.buffers import VAR_FACTOR
from aggregation.job_plan import JobPlan
from aggregation.merge import merge_updates
from aggregation.model_check import BrokenModel, check_next_model
from aggregation.quorum import QuorumNotMet
from aggregation.report import busy_seconds
from aggregation.round_step import aggregate_round
from aggregation.validate import validate_update
from node_payload.common import sparse_update, tensor_io
from node_payload.common.errors import EXIT_FATAL
from node_payload.common.run_config import CompressionTable, RunConfig, read_run_config
from node_payload.common.run_layout import (
    ASYNC_EVENTS,
    CONFIG_FILE,
    UPDATE_FILE,
    lane_job_dir,
    model_path,
    node_dir,
    round_metrics_path,
    server_state_path,
)
from node_payload.common.sparse_update import DATA, SparseTensor
from node_payload.compression import METHODS
from node_payload.residual_cache import Residual
from pipeline import config as config_mod
from pipeline import planner
from pipeline.mirrors import serve
from tests.test_sparse_update import Tiny

ROUND = 3
BOUND = 100.0
PLAN = JobPlan(samples=100, steps=40)
INT64_MAX = 2**63 - 1


SPARSE = ("conv.weight", "bn.weight", "bn.bias", "fc.weight", "fc.bias")


@pytest.fixture
def global_state() -> dict[str, torch.Tensor]:
    """A model some rounds in: running variances of 1.5, counters at 40."""
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in Tiny().state_dict().items()}
    state["bn.running_var"] += 0.5
    state["bn.num_batches_tracked"] += 40
    return state


def _honest(global_state, seed: int) -> dict[str, torch.Tensor]:
    """An update as a node sends it: small deltas, the counter advanced by `seed` steps."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(t.shape, generator=gen) * 0.1 if t.is_floating_point() else t + seed
        for name, t in global_state.items()
    }


def _write(directory: Path, node: int, tensors, samples: int | str = 100, meta=None) -> Path:
    path = directory / f"n{node:03d}.safetensors"
    metadata = tensor_io.update_metadata(ROUND, node, 0, ROUND) | {"samples": str(samples)}
    tensor_io.save_tensors(path, tensors, metadata | (meta or {}))
    return path


def _write_sparse(directory: Path, node: int, global_state, seed: int = 1) -> Path:
    """A DGC update: three values of each parameter sent, statistics and counter dense."""
    gen = torch.Generator().manual_seed(seed)
    sparse = {}
    for name in SPARSE:
        numel = global_state[name].numel()
        positions = torch.randperm(numel, generator=gen)[:3].sort().values
        values = (torch.randn(3, generator=gen) * 0.1).half()
        sparse[name] = SparseTensor(tuple(global_state[name].shape), positions, values)
    update = _honest(global_state, seed)
    dense = {name: t for name, t in update.items() if name not in SPARSE}
    path = directory / f"s{node:03d}.safetensors"
    metadata = tensor_io.update_metadata(ROUND, node, 100, ROUND)
    sparse_update.save_sparse_update(path, dense, sparse, metadata)
    return path


def _rejected(path: Path, global_state, node: int = 1, **kwargs) -> str:
    """The reason validation gives; the update must be refused."""
    check = validate_update(path, global_state, ROUND, node, BOUND, plan=PLAN, **kwargs)
    assert not check.ok, f"accepted: {path}"
    return check.reason


def _rejected_in_a_merge(tmp_path, global_state, bad: Path) -> str:
    """Merged beside an honest node 0: the bad node 1 is left out and node 0 alone counts."""
    good = _honest(global_state, 2)
    merged = merge_updates(
        global_state, [(0, _write(tmp_path, 0, good)), (1, bad)], BOUND, ROUND, plan=PLAN
    )
    assert merged.accepted == [0] and merged.samples == 100
    for name, tensor in good.items():
        assert torch.equal(merged.mean_update[name], tensor), name
    return merged.rejected[1]


def _spoiled_in_a_merge(tmp_path, global_state, spoil: Callable[[dict], None], seed: int) -> str:
    """The reason a merge gives for node 1's honest update once spoil(tensors) changed it."""
    bad = _honest(global_state, seed)
    spoil(bad)
    return _rejected_in_a_merge(tmp_path, global_state, _write(tmp_path, 1, bad))


# --- claimed sample counts -----------------------------------------------------------------------

CLAIMS = [
    (str(10**30), f"claims {10**30} samples, more than the 100 the plan gives a node"),
    (str(10**18), f"claims {10**18} samples, more than the 100 the plan gives a node"),
    ("101", "claims 101 samples, more than the 100 the plan gives a node ([data] local_train)"),
    ("9" * 5000, "claims a 5000-digit number of samples, more than the 100"),
    ("0", "metadata samples is '0', expected a positive integer"),
    ("000", "metadata samples is '000', expected a positive integer"),
    ("-5", "metadata samples is '-5', expected a positive integer"),
    ("12.5", "metadata samples is '12.5', expected a positive integer"),
    ("1e3", "metadata samples is '1e3', expected a positive integer"),
    ("5_0", "metadata samples is '5_0', expected a positive integer"),
    (" 50", "metadata samples is ' 50', expected a positive integer"),
    ("\u0665", "metadata samples is '\u0665', expected a positive integer"),  # Arabic-Indic 5
    ("", "metadata samples is '', expected a positive integer"),
    ("1" * 100, "metadata samples claims a 100-digit number of samples"),
]


@pytest.mark.parametrize(("samples", "reason"), CLAIMS)
def test_sample_claims_beyond_the_plan_or_not_numbers_are_rejected(
    tmp_path, global_state, samples, reason
):
    bad = _write(tmp_path, 1, _honest(global_state, 1), samples)
    assert reason in _rejected_in_a_merge(tmp_path, global_state, bad)


def test_the_planned_sample_count_itself_is_accepted(tmp_path, global_state):
    path = _write(tmp_path, 1, _honest(global_state, 1), "0100")
    check = validate_update(path, global_state, ROUND, 1, BOUND, plan=PLAN)
    assert check.ok and check.samples == 100


def _rejected_without(tmp_path, global_state, key: str) -> str:
    """The reason validation gives for an honest update whose metadata lacks key."""
    path = tmp_path / "u.safetensors"
    metadata = tensor_io.update_metadata(ROUND, 1, 10, ROUND)
    del metadata[key]
    tensor_io.save_tensors(path, _honest(global_state, 1), metadata)
    return _rejected(path, global_state)


def test_absent_sample_count_is_rejected(tmp_path, global_state):
    reason = _rejected_without(tmp_path, global_state, "samples")
    assert "metadata samples is None, expected a positive integer" in reason


def test_plan_follows_the_node_jobs_arithmetic():
    config = RunConfig().with_values("data", local_train=480)
    by_steps = config.with_values("train", local_steps=45, local_epochs=0.0, batch_size=32)
    by_epochs = config.with_values("train", local_steps=0, local_epochs=2.5, batch_size=32)
    assert JobPlan.from_config(by_steps) == JobPlan(samples=480, steps=45)
    assert JobPlan.from_config(by_epochs) == JobPlan(samples=480, steps=38)  # ceil(2.5 * 480 / 32)


# --- stale or foreign metadata -------------------------------------------------------------------

METADATA = [
    ({"format": "dagtrain-model/1"}, "metadata format is 'dagtrain-model/1'"),
    ({"round": "2"}, "metadata round is '2', expected 3"),
    ({"round": "03"}, "metadata round is '03', expected 3"),
    ({"node": "9"}, "metadata node is '9', expected 1"),
    ({"base_version": "2"}, "metadata base_version is '2', expected 3"),
    ({"base_version": "x" * 5000}, "metadata base_version is 'xxxxxxxxxxxxxxxxxxxx'... (5000"),
]


@pytest.mark.parametrize(("meta", "reason"), METADATA)
def test_stale_or_foreign_metadata_is_rejected(tmp_path, global_state, meta, reason):
    bad = _write(tmp_path, 1, _honest(global_state, 1), meta=meta)
    assert reason in _rejected_in_a_merge(tmp_path, global_state, bad)


def test_absent_round_is_rejected(tmp_path, global_state):
    assert "metadata round is None, expected 3" in _rejected_without(
        tmp_path, global_state, "round"
    )


# --- tensors -------------------------------------------------------------------------------------


def _reshape(tensors):
    tensors["fc.weight"] = torch.zeros(5, 9)


def _retype(tensors):
    tensors["fc.bias"] = tensors["fc.bias"].double()


def _counter_retype(tensors):
    tensors["bn.num_batches_tracked"] = tensors["bn.num_batches_tracked"].int()


def _drop(tensors):
    del tensors["bn.running_mean"]


def _extra(tensors):
    tensors["fc.extra"] = torch.zeros(1)


def _nan(tensors):
    tensors["conv.weight"][0, 0, 0, 0] = math.nan


def _huge(tensors):
    tensors["fc.weight"] += 1e3


TENSORS = [
    (_reshape, "tensor 'fc.weight' has shape (5, 9), expected (5, 8)"),
    (_retype, "tensor 'fc.bias' has dtype torch.float64, expected torch.float32"),
    (_counter_retype, "'bn.num_batches_tracked' has dtype torch.int32, expected torch.int64"),
    (_drop, "tensor 'bn.running_mean' is missing"),
    (_extra, "unexpected tensor 'fc.extra'"),
    (_nan, "tensor 'conv.weight' contains NaN or Inf"),
    (_huge, "exceeds the bound 100"),
]


@pytest.mark.parametrize(("corrupt", "reason"), TENSORS)
def test_bad_tensors_are_rejected_and_left_out(tmp_path, global_state, corrupt, reason):
    assert reason in _spoiled_in_a_merge(tmp_path, global_state, corrupt, seed=3)


# --- BatchNorm statistics and counters -----------------------------------------------------------


def _poisoned_variance(tensors):
    tensors["bn.running_var"] = torch.full((8,), 6.0)  # 1.5 - 6: every variance negative


def _variance_blown_up(tensors):
    tensors["bn.running_var"] = torch.full((8,), -1.5 * VAR_FACTOR * 1.01)


def _variance_crushed(tensors):
    tensors["bn.running_var"] = torch.full((8,), 1.5 - 1.5 / (VAR_FACTOR * 1.01))


def _mean_nan(tensors):
    tensors["bn.running_mean"][2] = math.nan


def _mean_inf(tensors):
    tensors["bn.running_mean"][0] = -math.inf


def _mean_far_away(tensors):
    tensors["bn.running_var"] = torch.zeros(8)  # the spread stays sqrt(1.5)
    tensors["bn.running_mean"][4] = 99.0  # 99 / sqrt(1.5): 80.8 standard deviations: allowed
    tensors["bn.running_mean"][5] = -150.0  # 122 standard deviations


def _counter_max(tensors):
    tensors["bn.num_batches_tracked"] = torch.tensor(INT64_MAX)


def _counter_negative(tensors):
    tensors["bn.num_batches_tracked"] = torch.tensor(-1)


def _counter_past_the_plan(tensors):
    tensors["bn.num_batches_tracked"] = torch.tensor(40 + PLAN.steps + 1)


STATISTICS = [
    (_poisoned_variance, "'bn.running_var': the node's running variance would be -4.5 at index 0"),
    (_variance_blown_up, "'bn.running_var': the running variance at index 0 changes from 1.5"),
    (_variance_crushed, "by more than the factor 1000 allowed in one update"),
    (_mean_nan, "tensor 'bn.running_mean' contains NaN or Inf"),
    (_mean_inf, "tensor 'bn.running_mean' contains NaN or Inf"),
    (_mean_far_away, "'bn.running_mean': the running mean at index 5 moves by 122.5 standard"),
    (_counter_max, f"counter 'bn.num_batches_tracked' is {INT64_MAX}, expected 0 to 80"),
    (_counter_negative, "counter 'bn.num_batches_tracked' is -1, expected 0 to 80"),
    (_counter_past_the_plan, "is 81, expected 0 to 80 (the model's 40 plus the 40 local steps"),
]


@pytest.mark.parametrize(("poison", "reason"), STATISTICS)
def test_poisoned_statistics_and_counters_are_rejected(tmp_path, global_state, poison, reason):
    assert reason in _spoiled_in_a_merge(tmp_path, global_state, poison, seed=1)


def test_counter_at_the_plan_and_a_variance_within_the_factor_are_accepted(tmp_path, global_state):
    update = _honest(global_state, PLAN.steps)  # the counter at exactly 40 + the planned steps
    update["bn.running_var"] = torch.full((8,), 1.5 - 1.5 * 900)  # 900 times the variance
    check = validate_update(_write(tmp_path, 1, update), global_state, ROUND, 1, 1e4, plan=PLAN)
    assert check.ok, check.reason


def test_integer_constants_of_the_network_must_come_back_unchanged(tmp_path):
    state = {"attn.weight": torch.zeros(4), "attn.relative_position_index": torch.arange(4)}
    update = {"attn.weight": torch.zeros(4), "attn.relative_position_index": torch.arange(4) + 1}
    assert "'attn.relative_position_index' differs from the model's; it is a constant" in (
        _rejected(_write(tmp_path, 1, update), state)
    )


def test_statistics_are_checked_against_the_model_the_job_started_from(tmp_path, global_state):
    """Asynchronous mode: a stale job's variance delta is relative to its own base model."""
    older = {**global_state, "bn.running_var": torch.full((8,), 4.0)}
    update = _honest(global_state, 1)
    update["bn.running_var"] = torch.full((8,), 3.0)  # from 4.0 to 1.0; from 1.5 to -1.5
    path = _write(tmp_path, 1, update)
    assert "running variance would be -1.5" in _rejected(path, global_state)
    check = validate_update(path, global_state, ROUND, 1, BOUND, plan=PLAN, base=older)
    assert check.ok, check.reason


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_robust_rules_combine_statistics_and_counters_too(tmp_path, global_state, rule):
    """A variance 900 times larger passes validation; the median of five ignores it."""
    updates = [_honest(global_state, seed) for seed in range(1, 6)]
    updates[4]["bn.running_var"] = torch.full((8,), 1.5 - 1.5 * 900)
    updates[4]["bn.num_batches_tracked"] = torch.tensor(40 + PLAN.steps)
    paths = [(n, _write(tmp_path, n, u)) for n, u in enumerate(updates)]
    merged = merge_updates(global_state, paths, 1e4, ROUND, rule, trim=0.2, plan=PLAN)
    assert merged.accepted == [0, 1, 2, 3, 4]
    good = torch.stack([u["bn.running_var"] for u in updates[:4]])
    delta = merged.mean_update["bn.running_var"]
    assert bool(((delta >= good.min(0).values) & (delta <= good.max(0).values)).all())
    assert int(merged.mean_update["bn.num_batches_tracked"]) == 43  # the lower median of 41..80


# --- the file itself -----------------------------------------------------------------------------


def _torch_save(path, global_state):
    torch.save(_honest(global_state, 1), path)


def _legacy_torch_save(path, global_state):
    torch.save(_honest(global_state, 1), path, _use_new_zipfile_serialization=False)


def _pickle_dumps(path, global_state):
    path.write_bytes(pickle.dumps({k: v.tolist() for k, v in global_state.items()}))


@pytest.mark.parametrize("write", [_torch_save, _legacy_torch_save, _pickle_dumps])
def test_pickles_posing_as_updates_are_refused_unread(tmp_path, global_state, write):
    path = tmp_path / "update.safetensors"
    write(path, global_state)
    reason = _rejected(path, global_state)
    assert str(path) in reason and "is a pickle / torch.save file, not a safetensors file" in reason
    assert "loading them can execute arbitrary code" in reason
    with pytest.raises(tensor_io.BadTensorFile, match="pickles are refused"):
        tensor_io.read_metadata(path)  # what the asynchronous arrival reads first


def _header_length(path: Path, length: int) -> None:
    data = path.read_bytes()
    path.write_bytes(length.to_bytes(8, "little") + data[8:])


@pytest.mark.parametrize(
    "length", [lambda size: size, lambda size: size + 100, lambda size: 2**63, lambda _: 2**64 - 1]
)
def test_header_length_past_the_file_is_refused(tmp_path, global_state, length):
    path = _write(tmp_path, 1, _honest(global_state, 1))
    _header_length(path, length(path.stat().st_size))
    reason = _rejected(path, global_state)
    assert str(path) in reason and "is not a safetensors file (truncated or corrupt?)" in reason


@pytest.mark.parametrize("keep", [0, 5, 20, -3, -10])
def test_truncated_and_empty_files_are_refused(tmp_path, global_state, keep):
    path = _write(tmp_path, 1, _honest(global_state, 1))
    path.write_bytes(path.read_bytes()[:keep])
    reason = _rejected(path, global_state)
    assert str(path) in reason and "is not a safetensors file (truncated or corrupt?)" in reason
    assert "pickle" not in reason


def test_absent_update_and_a_directory_in_its_place_are_refused(tmp_path, global_state):
    assert "cannot read the update" in _rejected(tmp_path / "absent", global_state)
    (tmp_path / "dir.safetensors").mkdir()
    reason = _rejected(tmp_path / "dir.safetensors", global_state)
    assert reason == f"{tmp_path / 'dir.safetensors'} is not a regular file"


def test_symbolic_links_are_refused_unread(tmp_path, global_state):
    """A link to another node's update, to a file outside the round, or to nothing at all."""
    outside = _write(tmp_path, 1, _honest(global_state, 1))  # a valid update, elsewhere
    round_dir = tmp_path / "rounds" / "r003"
    round_dir.mkdir(parents=True)
    for target in (outside, Path("/etc/passwd"), tmp_path / "nothing"):
        link = round_dir / "update.safetensors"
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        reason = _rejected(link, global_state)
        assert reason == f"{link} is a symbolic link (to {target}), not a file a node returned"


# --- DGC sparse updates --------------------------------------------------------------------------


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


def _edit(edit: Callable[[dict], None]) -> Callable[[dict, dict], None]:
    """A change of the packed parts, kept consistent with the layout's counts."""

    def change(tensors, meta):
        parts = _unpack(tensors, meta)
        edit(parts)
        parts["layout"]["idx"], parts["layout"]["sent"] = len(parts["index"]), len(parts["values"])
        meta["layout"] = sparse_update.encode_layout(parts["layout"])
        tensors[DATA] = sparse_update.pack(
            parts["index"], parts["values"], parts["stats"], parts["counters"]
        )

    return change


def _positions(positions: list[int]) -> Callable[[dict, dict], None]:
    def edit(parts):
        parts["index"] = sparse_update.encode_gaps(np.array(positions))
        parts["values"] = np.ones(len(positions), dtype=np.float16)

    return _edit(edit)


SENT_TOTAL = 8 * 3 * 9 + 8 + 8 + 5 * 8 + 5  # every value of the parameters in SPARSE


def _layout(change: Callable[[dict], None]) -> Callable[[dict, dict], None]:
    """A change of the layout alone: the stream stays as it was."""

    def edit(tensors, meta):
        layout = sparse_update.decode_layout(meta["layout"])
        change(layout)
        meta["layout"] = sparse_update.encode_layout(layout)

    return edit


def _set(key: str, value: object) -> Callable[[dict], None]:
    return lambda layout: layout.__setitem__(key, value)


def _bomb(tensors, meta):
    """80 MB of zeros in 78 KB: within deflate's 1032-fold, far beyond what the model needs."""
    layout = sparse_update.decode_layout(meta["layout"])
    layout["sparse"], layout["f16"], layout["i64"] = [], [], [["fc.bias", [10_000_000]]]
    layout["sent"] = layout["idx"] = 0
    meta["layout"] = sparse_update.encode_layout(layout)
    tensors[DATA] = torch.frombuffer(bytearray(zlib.compress(bytes(80_000_000))), dtype=torch.uint8)


def _long_data(tensors, meta):
    raw = zlib.decompress(tensors[DATA].numpy().tobytes()) + bytes(10**6)
    tensors[DATA] = torch.frombuffer(bytearray(zlib.compress(raw)), dtype=torch.uint8)


def _replace(name: str, value: Callable[[dict], object]) -> Callable[[dict, dict], None]:
    def edit(tensors, meta):
        tensors[name] = value(tensors)

    return edit


SPARSE_CASES = [
    (_positions([0, SENT_TOTAL]), f"index {SENT_TOTAL} is out of range: the sparse tensors hold"),
    (_positions([2**34]), "index 17179869184 is out of range"),
    (
        _edit(
            lambda p: p.update(index=np.array([3, 0, 4], np.uint8), values=np.ones(3, np.float16))
        ),
        "index 3 appears more than once",
    ),
    (
        _edit(lambda p: p["layout"]["sparse"][3].__setitem__(1, [8, 5])),
        "tensor 'fc.weight' has shape (8, 5), expected (5, 8)",
    ),
    (
        _edit(lambda p: p["layout"]["f16"][0].__setitem__(1, [4, 2])),
        "tensor 'bn.running_mean' has shape (4, 2), expected (8,)",
    ),
    (
        _edit(lambda p: p["layout"]["f16"][0].__setitem__(0, "bn2.running_mean")),
        "tensor 'bn.running_mean' is missing",
    ),
    (_edit(lambda p: p["values"].__setitem__(1, np.nan)), "the sent values contain NaN or Inf"),
    (
        _edit(lambda p: p["stats"].__setitem__(2, np.inf)),
        "the statistics sent dense contain NaN or Inf",
    ),
    (
        _edit(lambda p: p["stats"].__setitem__(slice(8, 16), 6.0)),  # every running_var delta +6
        "'bn.running_var': the node's running variance would be -4.5 at index 0",
    ),
    (
        _edit(lambda p: p["counters"].__setitem__(0, INT64_MAX)),
        f"counter 'bn.num_batches_tracked' is {INT64_MAX}",
    ),
    (
        _edit(lambda p: p.update(index=np.array([0x85], np.uint8), values=np.ones(1, np.float16))),
        "ends in the middle of a number",
    ),
    (_edit(lambda p: p.update(values=p["values"][:-1])), "indices but"),
    (
        _edit(
            lambda p: (
                p["layout"]["i64"].append(["fc.bias", [5]])
                or p.update(counters=np.concatenate([p["counters"], np.zeros(5, np.int64)]))
            )
        ),
        "metadata layout names a tensor twice",
    ),
    (_replace(DATA, lambda t: t[DATA].to(torch.int32)), "'::data' is torch.int32"),
    (
        _replace(DATA, lambda t: torch.arange(40, dtype=torch.uint8)),
        "'::data' is not a zlib stream",
    ),
    (
        _replace("fc.bias", lambda t: torch.zeros(5)),
        "tensor 'fc.bias' is in the file both packed and by name",
    ),
    (lambda t, m: t.pop(DATA), "has no '::data' tensor"),
    (lambda t, m: m.update(layout='{"fc.bias": [5]}'), "metadata layout is not"),
    (lambda t, m: m.update(compression="powersgd"), "metadata compression is 'powersgd'"),
    (_layout(lambda layout: layout.__setitem__("sent", layout["sent"] + 1)), "'::data' holds"),
    (_long_data, "'::data' holds more bytes, the layout says"),
    # Zip bombs: a layout claiming more than the model's tensors can need is refused before
    # anything is inflated, and a stream is never inflated past what its layout says.
    (_layout(_set("sent", 2**70)), "bytes, more than the 2352 the model can need"),
    (
        _layout(lambda layout: layout["sparse"][0].__setitem__(1, [10**6, 10**6])),
        "tensor 'conv.weight' has shape (1000000, 1000000), expected (8, 3, 3, 3)",
    ),
    (_bomb, "the layout says 80000000 bytes, more than the 2352 the model can need"),
]


@pytest.mark.parametrize(("change", "reason"), SPARSE_CASES)
def test_bad_sparse_updates_are_rejected_with_a_reason(tmp_path, global_state, change, reason):
    bad = _write_sparse(tmp_path, 1, global_state)
    tensors, meta = tensor_io.load_tensors(bad)
    change(tensors, meta)
    tensor_io.save_tensors(bad, tensors, meta)
    merged = merge_updates(
        global_state,
        [(0, _write_sparse(tmp_path, 0, global_state, seed=2)), (1, bad)],
        BOUND,
        ROUND,
        plan=PLAN,
    )
    assert merged.accepted == [0] and reason in merged.rejected[1], merged.rejected


def test_a_stream_is_bounded_by_deflate_even_without_a_model(tmp_path, global_state):
    """Readers other than the validator (merging, tests) still refuse an impossible layout."""
    path = _write_sparse(tmp_path, 1, global_state)
    tensors, meta = tensor_io.load_tensors(path)
    _layout(_set("sent", 2**70))(tensors, meta)
    tensor_io.save_tensors(path, tensors, meta)
    with (
        pytest.raises(sparse_update.BadSparseUpdate, match=r"more than .* zlib bytes can hold"),
        sparse_update.open_update(path),
    ):
        pass


def test_sparse_tensor_of_a_non_float32_model_tensor_is_rejected(tmp_path, global_state):
    doubled = {**global_state, "fc.bias": global_state["fc.bias"].double()}
    reason = _rejected(_write_sparse(tmp_path, 1, global_state), doubled)
    assert "tensor 'fc.bias' is sent sparse (float32), expected torch.float64" in reason


def test_norm_bound_applies_to_sparse_values(tmp_path, global_state):
    path = _write_sparse(tmp_path, 1, global_state)
    check = validate_update(path, global_state, ROUND, 1, 0.01, plan=PLAN)
    assert not check.ok and "exceeds the bound 0.01" in check.reason


# --- quantised updates ([compression] method fp16 and int8) --------------------------------------


def _write_quantised(directory: Path, node: int, global_state, method: str, seed: int = 1):
    """An fp16 or int8 update as a node's quantise step writes it."""
    update = _honest(global_state, seed)
    params = {"conv.weight", "bn.weight", "bn.bias", "fc.weight", "fc.bias"}
    encoded = METHODS[method](update, params, Residual(), CompressionTable(), 0)
    path = directory / f"q{node:03d}.safetensors"
    metadata = tensor_io.update_metadata(ROUND, node, 100, ROUND) | encoded.metadata
    tensor_io.save_tensors(path, encoded.tensors, metadata)
    return path


def _scale(value: torch.Tensor) -> Callable[[dict], None]:
    return lambda tensors: tensors.__setitem__("fc.weight::scale", value)


QUANTISED_CASES = [
    ("int8", _scale(torch.tensor(-0.5)), "scale 'fc.weight::scale' is -0.5, expected a finite"),
    ("int8", _scale(torch.tensor(math.nan)), "scale 'fc.weight::scale' is nan, expected a finite"),
    ("int8", _scale(torch.tensor(math.inf)), "scale 'fc.weight::scale' is inf, expected a finite"),
    ("int8", _scale(torch.tensor(3e38)), "tensor 'fc.weight' contains NaN or Inf"),
    ("int8", _scale(torch.tensor(5.0)), "exceeds the bound"),
    (
        "int8",
        _scale(torch.tensor(0.5, dtype=torch.float64)),
        "scale 'fc.weight::scale' is torch.float64 of shape (), expected a float32 scalar",
    ),
    (
        "int8",
        _scale(torch.ones(5)),
        "scale 'fc.weight::scale' is torch.float32 of shape (5,), expected a float32 scalar",
    ),
    (
        "int8",
        lambda t: t.pop("fc.weight::scale"),
        "int8 tensor 'fc.weight' has no scale 'fc.weight::scale'",
    ),
    (
        "int8",
        lambda t: t.__setitem__("fc.weight", t["fc.weight"].float()),
        "tensor 'fc.weight' has a scale but is torch.float32, expected torch.int8",
    ),
    (
        "int8",
        lambda t: t.__setitem__("nobody::scale", torch.tensor(1.0)),
        "tensor 'nobody::scale' scales no int8 tensor",
    ),
    (
        "int8",
        lambda t: t.__setitem__("fc.weight", torch.ones(5, 9, dtype=torch.int8)),
        "tensor 'fc.weight' has shape (5, 9), expected (5, 8)",
    ),
    (
        "fp16",
        lambda t: t.__setitem__("fc.bias", torch.tensor([math.nan] * 5, dtype=torch.float16)),
        "tensor 'fc.bias' contains NaN or Inf",
    ),
    (
        "fp16",
        lambda t: t.__setitem__("fc.bias", torch.ones(6, dtype=torch.float16)),
        "tensor 'fc.bias' has shape (6,), expected (5,)",
    ),
    (
        "fp16",
        lambda t: t.__setitem__("fc.bias", torch.ones(5, dtype=torch.float64)),
        "tensor 'fc.bias' has dtype torch.float64, expected torch.float32",
    ),
    (
        "fp16",
        lambda t: t.__setitem__("fc.bias", torch.ones(5, dtype=torch.int8)),
        "int8 tensor 'fc.bias' has no scale",
    ),
    (
        "fp16",
        lambda t: t.__setitem__("fc.bias::scale", torch.tensor(1.0)),
        "tensor 'fc.bias::scale' scales no int8 tensor of this fp16 update",
    ),
    (
        "fp16",
        lambda t: t.__setitem__(
            "bn.num_batches_tracked", t["bn.num_batches_tracked"].to(torch.float16)
        ),
        "tensor 'bn.num_batches_tracked' has dtype torch.float32, expected torch.int64",
    ),
]


@pytest.mark.parametrize(("method", "change", "reason"), QUANTISED_CASES)
def test_bad_quantised_updates_are_rejected_with_a_reason(
    tmp_path, global_state, method, change, reason
):
    bad = _write_quantised(tmp_path, 1, global_state, method)
    tensors, meta = tensor_io.load_tensors(bad)
    change(tensors)
    tensor_io.save_tensors(bad, tensors, meta)
    merged = merge_updates(
        global_state,
        [(0, _write_quantised(tmp_path, 0, global_state, method, seed=2)), (1, bad)],
        BOUND,
        ROUND,
        plan=PLAN,
    )
    assert merged.accepted == [0] and reason in merged.rejected[1], merged.rejected


# --- the next global model -----------------------------------------------------------------------


MODELS = [
    ("bn.running_var", -0.5, "tensor 'bn.running_var' would hold 8 running variances <= 0"),
    ("bn.running_var", 0.0, "tensor 'bn.running_var' would hold 8 running variances <= 0"),
    ("bn.running_mean", math.nan, "tensor 'bn.running_mean' would hold 8 NaN or Inf values"),
    ("fc.weight", math.inf, "tensor 'fc.weight' would hold 40 NaN or Inf values"),
    ("bn.num_batches_tracked", INT64_MAX, f"counter 'bn.num_batches_tracked' would be {INT64_MAX}"),
    ("bn.num_batches_tracked", -1, "counter 'bn.num_batches_tracked' would be -1, expected 0"),
    ("bn.num_batches_tracked", 4 * 40 + 1, "would be 161, expected 0 to 160"),
]


@pytest.mark.parametrize(("name", "value", "message"), MODELS)
def test_a_broken_next_model_is_named(global_state, name, value, message):
    state = {**global_state, name: torch.full_like(global_state[name], value)}
    with pytest.raises(BrokenModel) as error:
        check_next_model(state, 4, 40, "round 3's updates from nodes 0, 1")
    text = str(error.value)
    assert text.startswith(
        "the server step on round 3's updates from nodes 0, 1 would break the global model: "
    )
    assert message in text and text.endswith("; version 4 is not saved")
    check_next_model(global_state, 4, 40, "a sound model")


# --- through a synchronous round and an asynchronous arrival -------------------------------------


@pytest.fixture
def sync_run(tiny_config: Callable[..., Path], tmp_path: Path) -> Iterator[tuple[Path, dict]]:
    """A planned tiny run of 3 nodes (quorum 2), its mirrors serving."""
    run_dir = planner.plan_from_file(tiny_config(run__quorum="0.6"), tmp_path / "run")
    config = read_run_config(run_dir / CONFIG_FILE)
    ports = [int(url.rsplit(":", 1)[1]) for url in config.data.mirrors]
    with serve(Path(config.data.dataset), ports):
        yield run_dir, config


def _node_update(model: Path, poison: Callable[[str, torch.Tensor], torch.Tensor] | None = None):
    """An honest-looking update from the model file; poison(name, delta) changes a tensor."""
    state, _ = tensor_io.load_tensors(model)
    gen = torch.Generator().manual_seed(1)
    update = {
        name: torch.randn(t.shape, generator=gen) * 0.001 if t.is_floating_point() else t.clone()
        for name, t in state.items()
    }
    return {name: poison(name, t) for name, t in update.items()} if poison else update


def _plus_six_on_every_variance(name: str, delta: torch.Tensor) -> torch.Tensor:
    return delta + 6 if name.endswith("running_var") else delta


def _past_float32(name: str, delta: torch.Tensor) -> torch.Tensor:
    """Finite, within a raised norm bound, and too large once the server lr multiplies it."""
    return torch.full_like(delta, -2e38) if name == "classifier.weight" else delta


def _nothing_saved(run_dir: Path, version: int) -> None:
    assert not model_path(run_dir, version).exists()
    assert not server_state_path(run_dir, version).exists()
    assert not any(model_path(run_dir, version).parent.glob(f"*r{version:03d}*"))


def test_a_poisoned_variance_is_rejected_and_the_round_stays_sound(sync_run, capsys):
    run_dir, config = sync_run
    for node, poison in enumerate([None, None, _plus_six_on_every_variance]):
        update = _node_update(model_path(run_dir, 0), poison)
        tensor_io.save_tensors(
            node_dir(run_dir, 0, node) / "update.safetensors",
            update,
            tensor_io.update_metadata(0, node, 48, 0),
        )
    metrics = aggregate_round(run_dir, config, 0)
    assert metrics["nodes_used"] == 2 and list(metrics["nodes_rejected"]) == [2]
    assert "running variance would be -5" in metrics["nodes_rejected"][2]
    assert "round 0 node 2: rejected: tensor 'features.0.1.running_var'" in capsys.readouterr().out
    new, _ = tensor_io.load_tensors(model_path(run_dir, 1))
    assert all(bool((t > 0).all()) for n, t in new.items() if n.endswith("running_var"))
    assert math.isfinite(json.loads(round_metrics_path(run_dir, 0).read_text())["loss"])


def test_huge_sample_claims_do_not_stop_the_round(sync_run):
    run_dir, config = sync_run
    for node, samples in enumerate([48, str(10**30), str(10**18)]):
        path = node_dir(run_dir, 0, node) / "update.safetensors"
        meta = tensor_io.update_metadata(0, node, 1, 0) | {"samples": str(samples)}
        tensor_io.save_tensors(path, _node_update(model_path(run_dir, 0)), meta)
    with pytest.raises(QuorumNotMet) as error:
        aggregate_round(run_dir, config, 0)
    message = str(error.value)
    assert f"node 1: metadata samples claims {10**30} samples, more than the 48" in message
    assert f"node 2: metadata samples claims {10**18} samples, more than the 48" in message
    _nothing_saved(run_dir, 1)


def test_a_step_that_would_break_the_model_fails_the_round_and_saves_nothing(sync_run):
    run_dir, config = sync_run
    config = config.with_values("server", lr=2.0, max_update_norm=1e40)
    for node in range(3):
        tensor_io.save_tensors(
            node_dir(run_dir, 0, node) / "update.safetensors",
            _node_update(model_path(run_dir, 0), _past_float32),
            tensor_io.update_metadata(0, node, 48, 0),
        )
    with pytest.raises(BrokenModel) as error:
        aggregate_round(run_dir, config, 0)
    assert str(error.value) == (
        "the server step on round 0's updates from nodes 0, 1, 2 would break the global model: "
        "tensor 'classifier.weight' would hold 384 NaN or Inf values; version 1 is not saved"
    )
    _nothing_saved(run_dir, 1)
    assert not round_metrics_path(run_dir, 0).exists()


@pytest.fixture
def async_run(tiny_config: Callable[..., Path], tmp_path: Path) -> tuple[Path, dict]:
    """A planned asynchronous tiny run (3 lanes, FedAsync), lane 0's first job claimed."""
    path = tiny_config(run__mode='"async"', server__lr="2.0", server__max_update_norm="1e40")
    run_dir = planner.write(planner.make_plan(config_mod.load(path)), tmp_path / "run")
    config = read_run_config(run_dir / CONFIG_FILE)
    claim(run_dir, config, 0, 0)
    return run_dir, config


def _arrive(run_dir: Path, config: dict, update: dict, samples: str = "48") -> int:
    meta = tensor_io.update_metadata(0, 0, 1, 0) | {"samples": samples}
    tensor_io.save_tensors(lane_job_dir(run_dir, 0, 0) / UPDATE_FILE, update, meta)
    return arrive(run_dir, config, 0, 0, 0, 0, 2)


def test_a_poisoned_arrival_is_rejected_and_the_lane_goes_on(async_run):
    run_dir, config = async_run
    update = _node_update(model_path(run_dir, 0), _plus_six_on_every_variance)
    assert _arrive(run_dir, config, update) == 0
    ledger = read_ledger(run_dir)
    assert ledger.version == 0 and "running variance would be -5" in ledger.done["0:0"]
    assert "lane 0 step 0: rejected: tensor 'features.0.1.running_var'" in (
        (run_dir / ASYNC_EVENTS).read_text()
    )


def test_a_huge_sample_claim_on_arrival_is_rejected(async_run):
    run_dir, config = async_run
    assert _arrive(run_dir, config, _node_update(model_path(run_dir, 0)), str(10**30)) == 0
    assert f"claims {10**30} samples, more than the 48" in read_ledger(run_dir).done["0:0"]


def test_an_arrival_that_would_break_the_model_is_fatal_and_saves_nothing(async_run):
    run_dir, config = async_run
    before = read_ledger(run_dir)
    update = _node_update(model_path(run_dir, 0), _past_float32)
    assert _arrive(run_dir, config, update) == EXIT_FATAL
    message = (
        "lane 0 step 0: fatal: the server step on updates 0:0 (lane:step) would break the global "
        "model: tensor 'classifier.weight' would hold 384 NaN or Inf values; version 1 is not "
        "saved"
    )
    assert message in (run_dir / ASYNC_EVENTS).read_text()
    _nothing_saved(run_dir, 1)
    assert read_ledger(run_dir) == before  # not accepted, not done: the ledger is untouched


def test_a_symlinked_arrival_is_rejected_unread(async_run, tmp_path):
    run_dir, config = async_run
    outside = tmp_path / "elsewhere.safetensors"
    tensor_io.save_tensors(
        outside, _node_update(model_path(run_dir, 0)), tensor_io.update_metadata(0, 0, 48, 0)
    )
    link = lane_job_dir(run_dir, 0, 0) / UPDATE_FILE
    os.symlink(outside, link)
    assert arrive(run_dir, config, 0, 0, 0, 0, 2) == 0
    assert read_ledger(run_dir).done["0:0"] == (
        f"rejected: {link} is a symbolic link (to {outside}), not a file a node returned"
    )


def test_a_final_flush_that_would_break_the_model_is_logged_and_saves_nothing(
    tiny_config: Callable[..., Path], tmp_path: Path
):
    path = tiny_config(
        run__mode='"async"', async__buffer="2", server__lr="2.0", server__max_update_norm="1e40"
    )
    run_dir = planner.write(planner.make_plan(config_mod.load(path)), tmp_path / "run")
    config = read_run_config(run_dir / CONFIG_FILE)
    claim(run_dir, config, 0, 0)
    assert _arrive(run_dir, config, _node_update(model_path(run_dir, 0), _past_float32)) == 0
    assert read_ledger(run_dir).done["0:0"] == "accepted, staleness 0, weight 1"  # buffered
    flush(run_dir, config)
    assert "the last buffered updates: the server step on updates 0:0 (lane:step) would break" in (
        (run_dir / ASYNC_EVENTS).read_text()
    )
    _nothing_saved(run_dir, 1)
    assert len(read_ledger(run_dir).buffer) == 1


NOT_AN_OBJECT = "round 0 node 2: its metrics.json is not a JSON object; left out"


@pytest.mark.parametrize(
    ("metrics", "said"),
    [
        (b"\xff\xfe not json", NOT_AN_OBJECT),
        (b"[1, 2, 3]", NOT_AN_OBJECT),
        (
            json.dumps(
                {
                    "seconds": "forever",
                    "started_at": None,
                    "local_test_accuracy": "NaN",
                    "bytes_downloaded": -5,
                    "mirror_failovers": 1e999,
                    "train_fragments": ["x", -1, True, 10**30, None],
                    "bytes": "all of them",
                }
            ).encode(),
            "round 0 node 2: bytes left out: no byte record",
        ),
    ],
    ids=["not-json", "not-an-object", "lying-figures"],
)
def test_a_lying_metrics_file_skews_nothing_and_stops_no_round(sync_run, metrics, said, capsys):
    """metrics.json comes from the node: beside a valid update, whatever it holds is left out or
    counts as nothing, and the round and the run's busy times are still made."""
    run_dir, config = sync_run
    for node in range(3):
        update = _node_update(model_path(run_dir, 0))
        tensor_io.save_tensors(
            node_dir(run_dir, 0, node) / "update.safetensors",
            update,
            tensor_io.update_metadata(0, node, 48, 0),
        )
        honest = {"seconds": 2.0, "started_at": 1e9, "local_test_accuracy": 0.5}
        honest |= {"bytes_downloaded": 100, "mirror_failovers": 0, "train_fragments": [0, 1]}
        (node_dir(run_dir, 0, node) / "metrics.json").write_text(json.dumps(honest))
    (node_dir(run_dir, 0, 2) / "metrics.json").write_bytes(metrics)
    round_metrics = aggregate_round(run_dir, config, 0)
    assert round_metrics["nodes_used"] == 3
    assert round_metrics["bytes_downloaded"] == 200
    assert round_metrics["mirror_failovers"] == 0
    assert 0 < round_metrics["coverage"] <= 1
    assert math.isfinite(round_metrics["local_test_accuracy"])
    assert json.loads(round_metrics_path(run_dir, 0).read_text())["round"] == 0
    assert said in capsys.readouterr().out
    assert busy_seconds(run_dir, 1, 3) == {0: 2.0, 1: 2.0, 2: 0.0}
