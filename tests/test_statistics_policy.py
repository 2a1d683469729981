"""The one BatchNorm statistics policy of both modes (aggregation.statistics), through the merge
and the server step: the next statistics combine the nodes' own statistics, re-based onto the
current model when a job started from an older one, and never go through the optimizer."""

from pathlib import Path

import pytest
import torch

from aggregation.job_plan import JobPlan
from aggregation.merge import merge_updates
from aggregation.server_optimizer import ServerOptimizer
from node_payload.common import tensor_io
from tests.test_sparse_update import Tiny

PLAN = JobPlan(samples=200, steps=10)
VAR = "bn.running_var"
MEAN = "bn.running_mean"


@pytest.fixture
def models() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], set[str]]:
    """(current, older, parameter names): version 5 and the version 3 a stale job started
    from, whose statistics differ."""
    torch.manual_seed(0)
    network = Tiny()
    current = {k: v.clone() for k, v in network.state_dict().items()}
    current[VAR] = torch.linspace(1.0, 2.0, 8)
    current[MEAN] = torch.linspace(-0.5, 0.5, 8)
    older = {**current, VAR: torch.full((8,), 3.0), MEAN: torch.zeros(8)}
    return current, older, {name for name, _ in network.named_parameters()}


def _update(
    tmp_path: Path, node: int, base: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
) -> Path:
    """A node's update: small parameter deltas, its own statistics as base - own."""
    update = {
        name: (base[name] - own[name] if name in own else torch.full_like(t, 0.01))
        if t.is_floating_point()
        else t.clone()
        for name, t in base.items()
    }
    path = tmp_path / f"n{node}.safetensors"
    metadata = tensor_io.update_metadata(5, node, 50 * (node + 1), 5)
    tensor_io.save_tensors(path, update, metadata)
    return path


def _step(models, paths, rule="mean", bases=None, scales=None, clip_norm=0.0):
    current, _, params = models
    merged = merge_updates(
        current,
        enumerate(paths),
        1e6,
        5,
        rule,
        clip_norm=clip_norm,
        scales=scales,
        plan=PLAN,
        bases=bases,
    )
    assert merged.accepted == list(range(len(paths))), merged.rejected
    return ServerOptimizer("sgd", lr=0.5, momentum=0.9).step(current, merged.mean_update, params)


def test_a_round_takes_the_sample_weighted_mean_of_the_nodes_own_statistics(tmp_path, models):
    current = models[0]
    own = [{VAR: torch.full((8,), v), MEAN: torch.full((8,), m)} for v, m in ((0.5, 1), (2, -1))]
    paths = [_update(tmp_path, n, current, own[n]) for n in range(2)]
    state = _step(models, paths)
    torch.testing.assert_close(state[VAR], torch.full((8,), (0.5 * 50 + 2 * 100) / 150))
    torch.testing.assert_close(state[MEAN], torch.full((8,), (1 * 50 - 1 * 100) / 150))


def test_stale_statistics_are_mixed_into_the_current_ones_by_weight(tmp_path, models):
    """A stale update of weight w and share s moves the statistics s x w of the way from the
    current model to the node's own: (1 - W) x current + sum of w_i x own_i."""
    current, older, _ = models
    own = [{VAR: torch.full((8,), v), MEAN: torch.full((8,), m)} for v, m in ((0.5, 1), (4, -2))]
    paths = [_update(tmp_path, 0, older, own[0]), _update(tmp_path, 1, current, own[1])]
    state = _step(models, paths, bases={0: older}, scales={0: 0.25, 1: 1.0})
    shares = (0.25 * 50 / 150, 1.0 * 100 / 150)
    for name in (VAR, MEAN):
        mixed = (1 - sum(shares)) * current[name]
        mixed += sum(share * own[n][name] for n, share in enumerate(shares))
        torch.testing.assert_close(state[name], mixed)
    assert bool((state[VAR] > 0).all())


def test_a_clipped_update_moves_the_statistics_only_part_of_the_way(tmp_path, models):
    current = models[0]
    own = {VAR: torch.full((8,), 9.0)}
    path = _update(tmp_path, 0, current, own)
    full = _step(models, [path])
    clipped = _step(models, [path], clip_norm=1.0)
    torch.testing.assert_close(full[VAR], own[VAR])
    assert bool((clipped[VAR] < full[VAR]).all() and (clipped[VAR] > current[VAR]).all())


def test_a_robust_rule_takes_the_median_of_the_nodes_own_statistics(tmp_path, models):
    current, older = models[0], models[1]
    variances = (0.5, 40.0, 2.0)
    paths = [
        _update(tmp_path, n, older if n == 1 else current, {VAR: torch.full((8,), v)})
        for n, v in enumerate(variances)
    ]
    state = _step(models, paths, rule="median", bases={1: older})
    torch.testing.assert_close(state[VAR], torch.full((8,), 2.0))


def test_an_update_from_the_current_model_is_not_shifted(tmp_path, models):
    """Naming the current model as an update's base changes no bit of the result."""
    current = models[0]
    paths = [_update(tmp_path, n, current, {VAR: torch.full((8,), 1.0 + n)}) for n in range(2)]
    plain = _step(models, paths)
    based = _step(models, paths, bases={0: current, 1: current})
    for name, tensor in plain.items():
        assert torch.equal(based[name], tensor), name
