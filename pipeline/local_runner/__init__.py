"""Local runner: executes the generated DAG and submit files on this machine, the way DAGMan
and a schedd would, so a local run exercises exactly what a pool would run.

Supported DAG commands: JOB [DIR d] [DONE], FINAL, VARS (DAGMan escaping, $(JOB), $(RETRY)),
PARENT/CHILD, RETRY [UNLESS-EXIT], SCRIPT [DEFER s t] PRE|POST (with $JOB $RETRY $MAX_RETRIES
$RETURN $PRE_SCRIPT_RETURN $JOBID $DAG_STATUS $FAILED_COUNT), PRE_SKIP, DONE, CATEGORY,
MAXJOBS, PRIORITY, NODE_STATUS_FILE, ABORT-DAG-ON [RETURN], DOT (ignored: drawing only) and
CONFIG (only DAGMAN_MAX_JOBS_SUBMITTED, which caps slots, plus knobs about talking to a
schedd, which have nothing to act on here). Everything else is an error naming file and line.

Resuming: nodes marked DONE by the newest `<dag>.rescueNNN` and by the runner's journal
(`.local_runner/<dag>.journal`, kept when the runner is killed) are both skipped. A failed DAG
writes the next rescue DAG in DAGMan's partial format. A removed job (periodic_remove, or a
hold nothing would release) gives $RETURN -1002, as DAGMan reports externally removed jobs.
"""

from .job_process import REMOVED_RETURN
from .scheduler import DagInterrupted, DagResult, NodeEvent, run_dag

__all__ = ["REMOVED_RETURN", "DagInterrupted", "DagResult", "NodeEvent", "run_dag"]
