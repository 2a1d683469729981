"""The DAG as data: one model that the planner builds, the writer writes and the local runner
reads back, so what a run's DAG holds is checked on objects, never on text."""
