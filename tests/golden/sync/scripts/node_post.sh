#!/bin/sh
# POST script of every node (ALL_NODES), run by DAGMan on the submit host from the run directory,
# with the arguments $RETURN $RETRY $MAX_RETRIES $JOB. Whether a node job is accepted,
# retried, missing or fatal is decided in Python, by the same policy as an asynchronous job's
# (aggregation/node_outcome.py); see aggregation/node_post.py for what it then does.
exec "/usr/bin/python3" payload/dagtrain.pyz post "$@"
