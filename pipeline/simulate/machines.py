"""The pool's machines: their speeds, and which of them are free for the negotiator to match."""

import heapq
import math
import random

from .pool_model import Machines


def speeds(model: Machines, rng: random.Random) -> list[float]:
    """Each machine's speed against the reference machine (a slow one divides it)."""
    if model.speed == "lognormal" and model.speed_sigma > 0:
        mu = math.log(model.speed_median)
        drawn = [rng.lognormvariate(mu, model.speed_sigma) for _ in range(model.count)]
    else:
        drawn = [model.speed_median] * model.count
    for machine, factor in model.slow:
        if machine < model.count:
            drawn[machine] /= factor
    return drawn


class FreeMachines:
    """Available, unclaimed machines. "random": the negotiator takes any of them (HTCondor ranks
    none above another by default); "listed": the lowest number first, as the local runner's
    slots are taken."""

    def __init__(self, order: str, rng: random.Random) -> None:
        self.listed = order == "listed"
        self.rng = rng
        self.items: list[int] = []
        self.where: dict[int, int] = {}  # random order: machine -> its index in items

    def __len__(self) -> int:
        return len(self.where)

    def add(self, machine: int) -> None:
        if machine in self.where:
            return
        if self.listed:
            heapq.heappush(self.items, machine)
            self.where[machine] = 0
        else:
            self.where[machine] = len(self.items)
            self.items.append(machine)

    def discard(self, machine: int) -> None:
        if machine not in self.where:
            return
        index = self.where.pop(machine)
        if self.listed:
            return  # dropped lazily by take()
        last = self.items.pop()
        if last != machine:
            self.items[index] = last
            self.where[last] = index

    def take(self) -> int:
        if self.listed:
            while True:
                machine = heapq.heappop(self.items)
                if machine in self.where:
                    del self.where[machine]
                    return machine
        machine = self.items[self.rng.randrange(len(self.items))]
        self.discard(machine)
        return machine
