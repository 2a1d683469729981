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

Self-checkpointing and evictions: a job exiting with its `checkpoint_exit_code` has its
`transfer_checkpoint_files` copied to its spool (spool.py) and is restarted in its sandbox; an
evicted job (`run_dag(evictions=...)`, slots.Evictions) is logged as evicted (event 004), goes
back to the queue and starts its next run, on the next free slot, with the spool's files.

Deliberate differences from a pool: should_transfer_files IF_NEEDED (or unset) transfers, as
on an execute node without a shared file system (the strictest case); a vanilla job's PATH is
/usr/local/bin:/usr/bin:/bin unless `environment` sets it; PRE/POST script output is
discarded (DAGMan without DEBUG); SIGINT/SIGTERM stop the run without running FINAL, so a
rerun resumes instead of reporting on a half-finished DAG. An evicted job gives its slot back and
queues for one again by priority, keeping its MAXJOBS place as DAGMan's idle job does.

Warm interpreters (`run_dag(warm_pythons=...)`, what `dagtrain run` does unless `--cold`): a job
that runs `PYTHON dagtrain.pyz ...` with one of the run's configured Pythons starts in a fork of
a server that has imported torch, numpy and safetensors (warm_pool, warm_server) instead of a
fresh process. It keeps the job's sandbox, argv, environment, streams, process group, signals
and exit status, and imports the payload from the job's own dagtrain.pyz, so it writes the same
bytes. What differs from a fresh process: the interpreter's start-up was the server's (its hash
seed, and numpy's own BLAS threads, read from the server's environment; torch's threads are set
from the job's OMP_NUM_THREADS), so a job whose environment sets PYTHON* variables runs fresh;
and the server stands for one machine: if it dies, the jobs it runs die with it and fail
($RETURN -9, which RETRY reruns), and the next job starts a new server. `ps` shows a warm job
with the server's command line (find a job by its working directory, its sandbox). Scripts
(PRE/POST), the env_tarball wrapper and any other executable always start fresh.

Serial runs (`run_dag(serial=True)`): one node at a time, PRE script to POST script, in an order
fixed by the DAG and its finished nodes (serial_order), so the outcome never depends on timing;
DAGMan makes no promise about order, this is the local runner's own.
"""

from .job_process import REMOVED_RETURN
from .scheduler import DagInterrupted, DagResult, NodeEvent, run_dag

__all__ = ["REMOVED_RETURN", "DagInterrupted", "DagResult", "NodeEvent", "run_dag"]
