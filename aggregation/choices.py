"""Every registry a run config chooses from, by the name the config schema's keys give in
`choices`: the planner validates [server] rule, [server] optimizer, [async] staleness and
[compression] method against the registered names, so registering a function is what makes a
name allowed."""

from aggregation.combine import COMBINE_RULES
from aggregation.server_optimizer import SERVER_OPTIMIZERS
from aggregation.staleness import STALENESS
from node_payload.common.registry import Registry
from node_payload.compression import METHODS

REGISTRIES: dict[str, Registry] = {
    registry.name: registry for registry in (COMBINE_RULES, SERVER_OPTIMIZERS, STALENESS, METHODS)
}
