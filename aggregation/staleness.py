"""How much a stale update counts: FedAsync's staleness functions s(t), with s(0) = 1.

t is the number of model versions applied since the job's model was written. An update
computed on an old model points where the model used to be; weighting it down keeps fast lanes
from being dragged back by slow ones, without throwing the slow lanes' work away.
"""

RULES = ("constant", "polynomial", "hinge")


def staleness_weight(rule: str, staleness: int, a: float, b: int) -> float:
    """constant: 1; polynomial: (1 + t)^-a; hinge: 1 while t <= b, then 1 / (a (t - b) + 1)."""
    if staleness < 0:
        raise ValueError(f"staleness {staleness} is negative")
    if rule == "constant":
        return 1.0
    if rule == "polynomial":
        return (1.0 + staleness) ** -a
    if rule == "hinge":
        return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)
    raise ValueError(f"unknown staleness rule {rule!r}; expected one of {', '.join(RULES)}")
