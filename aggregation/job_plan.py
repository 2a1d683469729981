"""What the plan asks of one node job: the bounds its update's metadata and counters must keep.

A node's claimed sample count weights its update in the mean, and its BatchNorm counters are
carried into the global model, so neither may exceed what the resolved config asked of it.
"""

from dataclasses import dataclass

from node_payload.common.run_config import RunConfig
from node_payload.train import steps_for


@dataclass(frozen=True)
class JobPlan:
    """samples: the local training fragments a node draws ([data] local_train), which it sends
    as its sample count; steps: the local SGD steps it takes, each adding one to every counter."""

    samples: int
    steps: int

    @classmethod
    def from_config(cls, config: RunConfig) -> "JobPlan":
        """As the node job computes them (node_payload.node_job), from the same keys."""
        samples = config.data.local_train
        train = config.train
        steps = steps_for(train.local_steps, train.local_epochs, samples, train.batch_size)
        return cls(samples, steps)
