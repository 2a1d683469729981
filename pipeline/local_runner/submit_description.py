"""Read a node's submit file through htcondor2.Submit, so macro expansion is HTCondor's own.

The node's VARS are set as submit variables after the file is read (DAGMan's APPEND
behaviour) and every value is taken through `Submit.expand()`. Commands outside the supported
set are errors naming file and line: a command we ignored would run differently on a pool.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import htcondor2

from node_payload.common.errors import UserError

from .job_args import parse_arguments, parse_environment

SUPPORTED = {
    "universe", "executable", "arguments", "environment", "initialdir", "transfer_executable",
    "should_transfer_files", "when_to_transfer_output", "success_exit_code",
    "transfer_input_files", "transfer_output_files", "transfer_output_remaps", "log", "output",
    "error", "request_cpus", "request_memory", "request_disk", "request_gpus", "periodic_remove",
    "allowed_job_duration", "notification", "getenv", "max_retries", "stream_output",
    "stream_error", "checkpoint_exit_code", "transfer_checkpoint_files",
}  # fmt: skip
TRANSFER_WHEN = ("ON_EXIT", "ON_SUCCESS", "ON_EXIT_OR_EVICT")
_UNITS = {"": 1, "K": 1 / 1024, "KB": 1 / 1024, "M": 1, "MB": 1, "G": 1024, "GB": 1024,
          "T": 1024**2, "TB": 1024**2}  # fmt: skip


@dataclass
class JobSpec:
    """One queued job, with every path already resolved against the right directory."""

    submit_file: Path
    universe: str
    executable: Path
    arguments: list[str]
    environment: dict[str, str]
    initialdir: Path
    transfer_executable: bool = True
    sandboxed: bool = True
    when_to_transfer_output: str = "ON_EXIT"
    success_exit_code: int = 0
    transfer_input_files: list[str] = field(default_factory=list)
    transfer_output_files: list[str] | None = None
    transfer_output_remaps: dict[str, str] = field(default_factory=dict)
    log: Path | None = None
    output: Path | None = None
    error: Path | None = None
    request_cpus: int = 1
    request_memory_mb: int = 128
    request_disk_kb: int = 0
    periodic_remove: str | None = None
    allowed_job_duration: int | None = None
    checkpoint_exit_code: int | None = None  # the job took a checkpoint: spool it, restart
    transfer_checkpoint_files: list[str] | None = None  # None: as transfer_output_files
    attributes: dict[str, str] = field(default_factory=dict)


def _line_of(text: str, key: str) -> int:
    """Line of the last assignment to key (the one that wins), 0 if not found."""
    bare = key[3:] if key.upper().startswith("MY.") else key
    pattern = re.compile(rf"^\s*(?:\+|my\.)?{re.escape(bare)}\s*=", re.IGNORECASE)
    lines = [n for n, line in enumerate(text.splitlines(), start=1) if pattern.match(line)]
    return lines[-1] if lines else 0


def _queue_lines(text: str) -> list[int]:
    return [
        number
        for number, line in enumerate(text.splitlines(), start=1)
        if re.match(r"^\s*queue\b", line, re.IGNORECASE)
    ]


def _bool(value: str, where: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0"):
        return False
    raise UserError(f"{where}: expected true or false, got {value!r}")


def _int(value: str, where: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise UserError(f"{where}: expected an integer, got {value!r}") from None


def _megabytes(value: str, where: str, plain_unit: str) -> float:
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?B?)\s*", value, re.IGNORECASE)
    if match is None:
        raise UserError(f"{where}: expected a size like 512, 2GB, got {value!r}")
    unit = match.group(2).upper() or plain_unit
    return float(match.group(1)) * _UNITS[unit]


def _file_list(value: str) -> list[str]:
    return [item.strip() for item in value.replace("\n", ",").split(",") if item.strip()]


def _remaps(value: str, where: str) -> dict[str, str]:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    remaps: dict[str, str] = {}
    for item in value.split(";"):
        if not item.strip():
            continue
        src, sep, dst = item.partition("=")
        if not sep or not src.strip() or not dst.strip():
            raise UserError(f"{where}: transfer_output_remaps entry {item!r} is not 'name = dest'")
        remaps[src.strip()] = dst.strip()
    return remaps


def load_job(
    submit_file: Path, submit_dir: Path, variables: dict[str, str], cluster_id: int
) -> JobSpec:
    """Expand the submit file for one node attempt; paths follow condor_submit's rules:
    executable relative to the submit directory, everything else relative to initialdir."""
    if not submit_file.is_file():
        raise UserError(f"submit file {submit_file} does not exist")
    text = submit_file.read_text()
    queues = _queue_lines(text)
    if len(queues) != 1:
        raise UserError(
            f"{submit_file}: expected exactly one 'queue' statement, found {len(queues)}"
        )
    try:
        submit = htcondor2.Submit(text)
    except Exception as exc:
        raise UserError(f"{submit_file}: cannot be parsed by htcondor: {exc}") from exc
    qargs = submit.getQArgs().strip()
    if qargs not in ("", "1"):
        raise UserError(f"{submit_file}:{queues[0]}: 'queue {qargs}' queues more than one job")
    keys = list(submit.keys())
    referenced = {m.lower() for m in re.findall(r"\$\(([A-Za-z0-9_.]+)\)", text)}
    for key in keys:
        lower = key.lower()
        if lower in SUPPORTED or lower.startswith("my.") or lower in referenced:
            continue
        line = _line_of(text, key)
        raise UserError(
            f"{submit_file}:{line}: submit command {key!r} is not supported by the local runner"
        )
    for name, value in {**variables, "ClusterId": str(cluster_id), "Cluster": str(cluster_id),
                        "ProcId": "0", "Process": "0"}.items():  # fmt: skip
        submit[name] = value
    values = {key.lower(): submit.expand(key) for key in keys}
    attributes = {key[3:]: submit.expand(key) for key in keys if key.lower().startswith("my.")}
    attributes.update({k[3:]: v for k, v in variables.items() if k.lower().startswith("my.")})
    return _build(submit_file, submit_dir, text, values, attributes)


def _build(
    submit_file: Path, submit_dir: Path, text: str, values: dict[str, str], attrs: dict[str, str]
) -> JobSpec:
    def where(key: str) -> str:
        return f"{submit_file}:{_line_of(text, key)}"

    universe = values.get("universe", "vanilla").strip().lower()
    if universe not in ("vanilla", "local"):
        raise UserError(f"{where('universe')}: universe {universe!r} is not supported locally")
    if "executable" not in values:
        raise UserError(f"{submit_file}: no executable")
    gpus = values.get("request_gpus", "0").strip()
    if gpus and _int(gpus, where("request_gpus")) > 0:
        raise UserError(
            f"{where('request_gpus')}: request_gpus > 0 but the local runner has no GPUs"
        )
    if _int(values.get("max_retries", "0"), where("max_retries")) != 0:
        raise UserError(
            f"{where('max_retries')}: only max_retries = 0 is supported locally; "
            "let DAGMan's RETRY retry the node"
        )
    if "getenv" in values and _bool(values["getenv"], where("getenv")):
        raise UserError(f"{where('getenv')}: getenv = true is not supported; use environment")
    initialdir = submit_dir / values.get("initialdir", "").strip()
    when = values.get("when_to_transfer_output", "ON_EXIT").strip().upper()
    if when not in TRANSFER_WHEN:
        raise UserError(f"{where('when_to_transfer_output')}: expected one of {TRANSFER_WHEN}")
    should = values.get("should_transfer_files", "IF_NEEDED").strip().upper()
    if should not in ("YES", "NO", "IF_NEEDED"):
        raise UserError(f"{where('should_transfer_files')}: expected YES, NO or IF_NEEDED")

    def path(key: str) -> Path | None:
        value = values.get(key, "").strip()
        return initialdir / value if value else None

    outputs = values.get("transfer_output_files")
    duration = values.get("allowed_job_duration", "").strip()
    checkpoint_code = values.get("checkpoint_exit_code", "").strip()
    checkpoint_files = values.get("transfer_checkpoint_files")
    return JobSpec(
        submit_file=submit_file,
        universe=universe,
        executable=submit_dir / values["executable"].strip(),
        arguments=parse_arguments(values.get("arguments", ""), where("arguments")),
        environment=parse_environment(values.get("environment", ""), where("environment")),
        initialdir=initialdir,
        transfer_executable=_bool(values.get("transfer_executable", "true"), where("transfer_executable")),
        sandboxed=universe == "vanilla" and should != "NO",
        when_to_transfer_output=when,
        success_exit_code=_int(values.get("success_exit_code", "0"), where("success_exit_code")),
        transfer_input_files=_file_list(values.get("transfer_input_files", "")),
        transfer_output_files=None if outputs is None else _file_list(outputs.strip('"')),
        transfer_output_remaps=_remaps(values.get("transfer_output_remaps", ""), where("transfer_output_remaps")),
        log=path("log"),
        output=path("output"),
        error=path("error"),
        request_cpus=_int(values.get("request_cpus", "1"), where("request_cpus")),
        request_memory_mb=round(_megabytes(values.get("request_memory", "128"), where("request_memory"), "MB")),
        request_disk_kb=round(1024 * _megabytes(values.get("request_disk", "0"), where("request_disk"), "KB")),
        periodic_remove=values.get("periodic_remove", "").strip() or None,
        allowed_job_duration=_int(duration, where("allowed_job_duration")) if duration else None,
        checkpoint_exit_code=_int(checkpoint_code, where("checkpoint_exit_code")) if checkpoint_code else None,
        transfer_checkpoint_files=None if checkpoint_files is None else _file_list(checkpoint_files),
        attributes=attrs,
    )  # fmt: skip
