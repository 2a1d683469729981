"""The shared kernel: what the planner, the aggregator and the node job all import.

It lives inside `node_payload` because the job payload (`dagtrain.pyz`) must run on execute
nodes that have Python and torch but not dagtrain: everything a job needs ships with it, and
the planner and aggregator read and write the same files through the same code. Modules here
use the standard library and torch only, never `pipeline`.
"""
