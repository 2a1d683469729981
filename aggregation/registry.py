"""The named implementations a run config may choose; the config's allowed values come from here."""

from aggregation import robust, server_optimizer, staleness

REGISTRIES: dict[str, tuple[str, ...]] = {
    "combine_rules": robust.RULES,
    "server_optimizers": server_optimizer.KINDS,
    "staleness": staleness.RULES,
}
