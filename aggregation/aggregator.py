"""The aggregation step: what accepted updates become, the same in both modes.

In the spirit of Flower's Strategy.aggregate_fit, but composed rather than inherited: built once
from the resolved run config, an Aggregator runs validation -> clipping -> the combine rule
(`merge`: aggregation.merge, aggregation.combine), then the server optimizer step -> the
statistics policy -> the check of the next model (`advance`: aggregation.server_optimizer,
aggregation.statistics, aggregation.model_check), and writes the next version. A synchronous
round (round_step) offers its nodes' updates and checks its quorum between the two; an
asynchronous arrival (async_apply) offers its buffer, with staleness weights and the versions
the jobs started from. A mode decides which updates arrive and when; this decides what they
become, so the two modes cannot drift apart in how a model is made.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from aggregation.job_plan import JobPlan
from aggregation.merge import MergeResult, merge_updates
from aggregation.model_check import check_next_model
from aggregation.server_optimizer import ServerOptimizer
from aggregation.staleness import staleness_weight
from aggregation.validate import Validation, validate_update
from node_payload.common.errors import UserError
from node_payload.common.model_file import load_model, save_model
from node_payload.common.run_config import RunConfig
from node_payload.common.run_layout import model_path, server_state_path
from node_payload.common.tensor_io import load_tensors, open_lazy, save_tensors

Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Offered:
    """One update a mode hands the aggregation step.

    key: the node (synchronous) or the update's place in the buffer; expected: the metadata it
    must carry when not the round's own (asynchronous: its step, lane and base version);
    base_version: the version its job started from; weight: its staleness weight.
    """

    key: int
    path: Path
    expected: Mapping[str, int] | None = None
    base_version: int | None = None
    weight: float = 1.0


@dataclass(frozen=True)
class GlobalModel:
    """A version of the global model: its network, its file's metadata and a copy of its
    tensors, the reference every update is checked against and stepped from."""

    version: int
    network: torch.nn.Module
    metadata: dict[str, str]
    state: dict[str, torch.Tensor]

    @property
    def params(self) -> set[str]:
        """Trainable parameters: what the server optimizer steps (the rest: the statistics
        policy)."""
        return {name for name, _ in self.network.named_parameters()}


class Aggregator:
    """The run's aggregation step, its settings read once from the config."""

    def __init__(self, run_dir: Path, config: RunConfig) -> None:
        self.run_dir = run_dir
        self._server = config.server
        cosine = config.is_async and config.async_.mixing_schedule == "cosine"
        self._decay_steps = config.schedule_length if cosine else 0
        self._staleness = config.async_
        self._plan = JobPlan.from_config(config)

    def load(self, version: int) -> GlobalModel:
        network, metadata = load_model(model_path(self.run_dir, version))
        state = {k: v.detach().clone() for k, v in network.state_dict().items()}
        return GlobalModel(version, network, metadata, state)

    def staleness_weight(self, staleness: int) -> float:
        """How much an update `staleness` versions old counts ([async] staleness)."""
        rules = self._staleness
        return staleness_weight(rules.staleness, staleness, rules.staleness_a, rules.staleness_b)

    def check(self, current: GlobalModel, offered: Offered) -> Validation:
        """Validation alone, as `merge` validates: an asynchronous arrival's, before it is
        buffered."""
        return validate_update(
            offered.path,
            current.state,
            current.version,
            offered.key,
            self._server.max_update_norm,
            offered.expected,
            plan=self._plan,
            base=self._base(current, offered.base_version),
        )

    def merge(self, current: GlobalModel, offered: Sequence[Offered]) -> MergeResult:
        """Validation, clipping and the combine rule; nothing is written."""
        server = self._server
        bases = {v: self._base(current, v) for v in {o.base_version for o in offered}}
        return merge_updates(
            current.state,
            [(o.key, o.path) for o in offered],
            server.max_update_norm,
            current.version,
            server.rule,
            server.trim,
            server.clip_norm,
            expected={o.key: o.expected for o in offered if o.expected is not None},
            scales={o.key: o.weight for o in offered},
            plan=self._plan,
            bases={o.key: base for o in offered if (base := bases[o.base_version]) is not None},
        )

    def advance(self, current: GlobalModel, merged: MergeResult, what: str) -> GlobalModel:
        """The server step on what `merge` accepted (`what` names it for messages: "round 3's
        updates from nodes 0, 2"), the check of the next model (BrokenModel: nothing is
        written), then its files: the server state, then the model, each atomically, so a kill
        in between only makes a rerun write the same files again. The next version reuses
        current's network."""
        optimizer = self._optimizer(current.version)
        state = optimizer.step(current.state, merged.mean_update, current.params)
        version = current.version + 1
        check_next_model(state, version, self._plan.steps, what)
        current.network.load_state_dict(state)
        metadata = {**current.metadata, "version": str(version)}
        save_tensors(server_state_path(self.run_dir, version), *optimizer.state_dict())
        save_model(model_path(self.run_dir, version), current.network, metadata)
        return GlobalModel(version, current.network, metadata, state)

    def _optimizer(self, version: int) -> ServerOptimizer:
        optimizer = ServerOptimizer.from_config(self._server, self._decay_steps)
        path = server_state_path(self.run_dir, version)
        try:
            optimizer.load_state_dict(*load_tensors(path))
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(f"{path}: cannot resume the server optimizer: {exc}") from None
        return optimizer

    def _base(self, current: GlobalModel, version: int | None) -> Tensors | None:
        """The non-parameter tensors (statistics, counters) of the version a job started
        from, when older than the current one: what its update is checked against and its
        statistics re-based from (aggregation.buffers, aggregation.statistics)."""
        if version is None or version == current.version:
            return None
        params = current.params
        with open_lazy(model_path(self.run_dir, version)) as model:
            return {name: model.get(name) for name in current.state if name not in params}
