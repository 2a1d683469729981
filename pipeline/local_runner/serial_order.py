"""The fixed order of a serial run (`run_dag(serial=True)`): which ready node runs next.

With one node at a time, a run's result depends only on this choice. It is a function of the
DAG and of the set of finished nodes, never of timing or of when a node became ready, so a
resumed run, which knows only its finished nodes, takes the path an uninterrupted one takes.
Layer first (the longest path from a root), then DAG file order: the lanes of an asynchronous
run take turns and each job starts from the newest model.
"""

from __future__ import annotations

from pipeline.dag.model import Dag


def serial_ranks(dag: Dag) -> dict[str, tuple[int, int]]:
    """(layer, DAG file order) of every node; the ready node with the smallest runs next."""
    waiting = {name: len(node.parents) for name, node in dag.nodes.items()}
    layer = [name for name, count in waiting.items() if count == 0]
    depth: dict[str, int] = {}
    level = 0
    while layer:
        following = []
        for name in layer:
            depth[name] = level
            for child in dag.nodes[name].children:
                waiting[child] -= 1
                if waiting[child] == 0:
                    following.append(child)
        layer, level = following, level + 1
    return {name: (depth[name], node.order) for name, node in dag.nodes.items()}
