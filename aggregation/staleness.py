"""How much a stale update counts: FedAsync's staleness functions s(t), with s(0) = 1.

t is the number of model versions applied since the job's model was written. An update
computed on an old model points where the model used to be; weighting it down keeps fast lanes
from being dragged back by slow ones, without throwing the slow lanes' work away. Each function
takes t and the config's [async] staleness_a and staleness_b.
"""

from collections.abc import Callable

from node_payload.common.registry import Registry

StalenessFunction = Callable[[int, float, int], float]
STALENESS: Registry[StalenessFunction] = Registry("staleness", "[async] staleness")


@STALENESS.register("constant")
def constant(staleness: int, a: float, b: int) -> float:
    """1: every update counts in full, however old its model."""
    return 1.0


@STALENESS.register("polynomial")
def polynomial(staleness: int, a: float, b: int) -> float:
    """(1 + t)^-a: smoothly less for every version missed."""
    return (1.0 + staleness) ** -a


@STALENESS.register("hinge")
def hinge(staleness: int, a: float, b: int) -> float:
    """1 while t <= b, then 1 / (a (t - b) + 1): a few versions behind is no staleness at all."""
    return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)


def staleness_weight(rule: str, staleness: int, a: float, b: int) -> float:
    """s(t) of the function named `rule`."""
    if staleness < 0:
        raise ValueError(f"staleness {staleness} is negative")
    return STALENESS[rule](staleness, a, b)
