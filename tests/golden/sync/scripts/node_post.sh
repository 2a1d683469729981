#!/bin/sh
# POST script of every node job: arguments $RETURN $RETRY $MAX_RETRIES NODE_DIR [LANE_DIR].
# With LANE_DIR (compressed updates), a successful job's residual becomes its lane's, for the
# node's job in the next round.
# A failed node is retried by DAGMan, and so is a job killed by a signal ($RETURN -N: the
# volunteer's machine killed it); after its last try it counts as missing (the round goes on if
# the quorum holds), and so does a job removed at the deadline or held ($RETURN -1002) or never
# submitted (-1001). A fatal exit (bad config) fails the node, and so the DAG, because retrying
# cannot help.
ret=$1
retry=$2
max_retries=$3
node_dir=$4
lane_dir=$5
fatal=78

if [ "$ret" -eq 0 ]; then
    rm -f "$node_dir/MISSING"
    if [ -n "$lane_dir" ] && [ -f "$node_dir/residual.safetensors" ]; then
        mv -f "$node_dir/residual.safetensors" "$lane_dir/residual.safetensors" || exit 1
    fi
    exit 0
fi
if [ "$ret" -eq "$fatal" ]; then
    echo "fatal error: see $node_dir/job.err" >&2
    exit "$fatal"
fi
if [ "$ret" -le -1000 ]; then
    echo "removed (deadline passed or held), DAGMan return value $ret" > "$node_dir/MISSING"
    exit 0
fi
if [ "$retry" -lt "$max_retries" ]; then
    [ "$ret" -gt 0 ] && exit "$ret"
    exit 1  # killed by a signal: an exit code cannot be negative, any failure asks for a retry
fi
if [ "$ret" -lt 0 ]; then
    echo "failed $((retry + 1)) times, last killed by signal $((-ret))" > "$node_dir/MISSING"
    exit 0
fi
echo "failed $((retry + 1)) times, last exit code $ret" > "$node_dir/MISSING"
exit 0
