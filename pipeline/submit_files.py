"""The submit files and scripts of a run, rendered from dagman_templates/ with its config."""

from node_payload.checkpoint_files import CHECKPOINT_EXIT, FILES
from node_payload.common.errors import EXIT_FATAL
from node_payload.common.run_config import RunConfig
from node_payload.common.run_layout import (
    AGGREGATE_SUBMIT,
    CONFIG_FILE,
    ENV_WRAPPER,
    LANE_SCRIPT,
    NODE_POST_SCRIPT,
    NODE_SUBMIT,
    REPORT_SUBMIT,
)
from pipeline.job_paths import PAYLOAD, ROUND_DIR, node_job_files
from pipeline.render import render


def submit_files(config: RunConfig) -> dict[str, str]:
    """Each file's text by its path in the run directory; only the mode's own files."""
    execution, submit_python = config.execution, config.execution.submit_python
    run_files = {"payload": PAYLOAD, "config": CONFIG_FILE}
    files = {
        NODE_SUBMIT: render(
            "node.sub.j2",
            is_async=config.is_async,
            files=node_job_files(config),
            python=execution.python,
            container_image=execution.container_image,
            deadline_s=config.run.node_deadline_s,
            resources=config.resources,
            config=CONFIG_FILE,
            checkpoint_s=config.train.checkpoint_s,
            checkpoint_exit=CHECKPOINT_EXIT,
            checkpoint_files=FILES,
        ),
        REPORT_SUBMIT: render("report.sub.j2", python=submit_python, **run_files),
    }
    if config.is_async:
        files[LANE_SCRIPT] = render("lane.sh.j2", python=submit_python)
    else:
        files[AGGREGATE_SUBMIT] = render(
            "aggregate.sub.j2", python=submit_python, round_dir=ROUND_DIR, **run_files
        )
        files[NODE_POST_SCRIPT] = render("node_post.sh.j2", python=submit_python)
    if execution.env_tarball:
        files[ENV_WRAPPER] = render("run_in_env.sh.j2", fatal_exit=EXIT_FATAL)
    return files
