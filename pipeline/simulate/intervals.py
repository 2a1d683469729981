"""A machine's available and unavailable intervals, drawn from the laws the pool model names.

Desktop-grid availability studies (docs/sizing.md) fit available intervals with a Weibull law of
shape below 1 (many short sessions, a few very long ones) and unavailable ones with a log-normal
law; "always" is a dedicated machine (or a local runner's slot) that never leaves.
"""

import math
import random

from .pool_model import Availability


def draw(rng: random.Random, law: str, shape: float, scale_s: float) -> float:
    """One interval in seconds: Weibull(shape k, scale) or log-normal(sigma, median)."""
    if law == "always":
        return math.inf
    if law == "weibull":
        return rng.weibullvariate(scale_s, shape)
    return rng.lognormvariate(math.log(scale_s), shape)


def mean(law: str, shape: float, scale_s: float) -> float:
    """The law's mean interval, for the stationary share of available machines."""
    if law == "always":
        return math.inf
    if law == "weibull":
        return scale_s * math.gamma(1 + 1 / shape)
    return scale_s * math.exp(shape * shape / 2)


def stationary_share(model: Availability) -> float:
    """The long-run share of time a machine is available."""
    on = mean(model.on, model.on_shape, model.on_scale_s)
    off = mean(model.off, model.off_shape, model.off_scale_s)
    if math.isinf(on):
        return 1.0
    return on / (on + off)


def next_on(rng: random.Random, model: Availability) -> float:
    return draw(rng, model.on, model.on_shape, model.on_scale_s)


def next_off(rng: random.Random, model: Availability) -> float:
    """An unavailable interval (the owner's session)."""
    return draw(rng, model.off, model.off_shape, model.off_scale_s)
