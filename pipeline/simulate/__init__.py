"""`dagtrain simulate`: the planned DAG run in virtual time on a model of a desktop-grid pool.

The run is planned by the real planner into a temporary directory and its DAG read back by the
local runner's parser, so the simulation runs the DAG a pool would run (`workload.py`). A pool
model (`pool_model.py`, a TOML file) describes the machines (`machines.py`), their availability
(`intervals.py`), the negotiator, the transfers (`links.py`) and the job costs. `engine.py`
plays DAGMan's semantics over it into a `trace.py`, `variants.py` picks the runs to compare
(sync, sync with a quorum, async), `summary.py` turns a trace into figures and `display.py`
prints and plots them; `command.py` is `dagtrain simulate`.
"""
