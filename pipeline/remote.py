"""Submitting and watching a run on another machine's HTCondor, over SSH and SFTP.

The run directory is copied once to the submit host and the DAG runs there; its files stay the
truth from then on. `status` copies the few small files the status view reads (status file, job
logs, round metrics) into a local cache and shows them with the same view as a local run.
Host keys are checked against known_hosts and never added silently.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType

import paramiko

from node_payload.common.errors import UserError
from node_payload.common.run_config import read_run_config
from node_payload.common.run_layout import (
    CONFIG_FILE,
    DAG_FILE,
    MISSING_MARK,
    REPORT_FILE,
    STATUS_FILE,
)
from pipeline.rescue import reopen_missing_nodes
from pipeline.run_status import RunStatus, read_status
from pipeline.submission import (
    ACTIVE_JOB,
    SCHEDULER_UNIVERSE,
    check_not_finished,
    check_run_dir,
    dag_options,
)

_TARGET = re.compile(r"^(?:(?P<user>[^@]+)@)?(?P<host>\[[^\]]+\]|[^:@]+)(?::(?P<port>\d+))?$")
_SUBMITTED = re.compile(r"submitted to cluster (\d+)")
_RESCUE = re.compile(re.escape(DAG_FILE) + r"\.rescue\d{3}$")
# The files the status view reads, relative to a round's directory.
_ROUND_FILES = ("round.json", "aggregate.log")
_NODE_FILES = ("job.log", MISSING_MARK)
CONNECT_TIMEOUT_S = 10


@dataclass(frozen=True)
class Target:
    user: str | None
    host: str
    port: int = 22

    @property
    def known_hosts_name(self) -> str:
        """How OpenSSH (and paramiko) name this host in known_hosts."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


@dataclass(frozen=True)
class SshOptions:
    target: Target
    known_hosts: Path | None = None
    identity: Path | None = None


def parse_target(text: str) -> Target:
    """`user@host[:port]`; the user defaults to SSH's (the local user name)."""
    match = _TARGET.match(text)
    if not match:
        raise UserError(f"--remote {text!r}: expected user@host or user@host:port")
    port = int(match["port"] or 22)
    if not 0 < port < 65536:
        raise UserError(f"--remote {text!r}: port {port} is not between 1 and 65535")
    return Target(match["user"], match["host"].strip("[]"), port)


def default_remote_dir(run_dir: Path) -> str:
    """`~/dagtrain-runs/<run name>-<hash of the local path>`: stable, so `status` finds it."""
    name = read_run_config(run_dir / CONFIG_FILE).run.name
    digest = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:8]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"
    return f"~/dagtrain-runs/{safe}-{digest}"


class _RejectUnknown(paramiko.RejectPolicy):
    """RejectPolicy, with a message that says how to trust the host."""

    def __init__(self, known_hosts: str) -> None:
        self.known_hosts = known_hosts

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        host, _, port = hostname.strip("[").partition("]:")
        scan = f"ssh-keyscan -p {port} {host}" if port else f"ssh-keyscan {host}"
        raise UserError(
            f"{hostname} is not a known host (no key in {self.known_hosts}; it offers "
            f"{key.get_name()} {key.fingerprint}). Check that fingerprint with the host's "
            f"administrator, then add the key: {scan} >> {self.known_hosts} "
            "(or connect once with ssh and accept it)"
        )


class SshSession:
    """One SSH connection: commands and SFTP, with each failure turned into one clear message."""

    def __init__(self, options: SshOptions, role: str = "submit host") -> None:
        self.options = options
        self.target = options.target
        self.role = role  # what the host is to the user, for error messages
        self.client = paramiko.SSHClient()
        known = options.known_hosts or Path.home() / ".ssh" / "known_hosts"
        if options.known_hosts is not None and not known.is_file():
            raise UserError(f"--known-hosts {known}: no such file")
        if known.is_file():
            self.client.load_system_host_keys(str(known))
        self.client.set_missing_host_key_policy(_RejectUnknown(str(known)))
        self._connect(known)
        self.sftp = self.client.open_sftp()
        self.home = self.sftp.normalize(".")

    def _connect(self, known: Path) -> None:
        target, identity = self.target, self.options.identity
        where = f"{target.host}:{target.port}"
        if identity is not None and not identity.is_file():
            raise UserError(f"--identity {identity}: no such key file")
        try:
            self.client.connect(
                target.host,
                target.port,
                username=target.user,
                key_filename=str(identity) if identity else None,
                timeout=CONNECT_TIMEOUT_S,
                banner_timeout=CONNECT_TIMEOUT_S,
                auth_timeout=CONNECT_TIMEOUT_S,
            )
        except paramiko.BadHostKeyException as exc:
            raise UserError(
                f"host key mismatch for {target.known_hosts_name}: it offers "
                f"{exc.key.get_name()} {exc.key.fingerprint}, but {known} expects "
                f"{exc.expected_key.fingerprint}. Someone may be intercepting the connection; "
                f"if the host was reinstalled, remove the old key with "
                f"`ssh-keygen -f {known} -R '{target.known_hosts_name}'` and add the new one"
            ) from None
        except (OSError, paramiko.SSHException) as exc:
            transport = self.client.get_transport()
            if isinstance(exc, paramiko.AuthenticationException) or (
                transport is not None and transport.is_active()
            ):
                # Connected but not let in. paramiko may report this as the last error of its
                # key attempts (e.g. a key file it cannot parse) rather than as a refusal.
                user = f"{target.user}@" if target.user else ""
                raise UserError(
                    f"SSH authentication as {user}{where} failed ({exc}); load your key into "
                    "ssh-agent, or name it with --identity FILE"
                ) from None
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise UserError(f"cannot reach the {self.role} {where}: {reason}") from None

    def close(self) -> None:
        self.client.close()

    def path(self, remote_dir: str) -> str:
        """An absolute remote path; `~/` is the login directory, as in a shell."""
        if remote_dir == "~" or remote_dir.startswith("~/"):
            return str(PurePosixPath(self.home) / remote_dir[2:])
        return str(PurePosixPath(self.home) / remote_dir)

    def run(self, command: str, cwd: str | None = None) -> tuple[int, str, str]:
        """Run a shell command (in `cwd`); returns exit status, stdout, stderr."""
        if cwd is not None:
            command = f"cd {shlex.quote(cwd)} && {command}"
        _, stdout, stderr = self.client.exec_command(command, timeout=120)
        out, err = stdout.read().decode(errors="replace"), stderr.read().decode(errors="replace")
        return stdout.channel.recv_exit_status(), out, err

    def exists(self, path: str) -> bool:
        try:
            self.sftp.stat(path)
        except FileNotFoundError:
            return False
        return True

    def listdir(self, path: str) -> list[paramiko.SFTPAttributes]:
        try:
            return self.sftp.listdir_attr(path)
        except FileNotFoundError:
            return []

    def upload_tree(self, local: Path, remote: str) -> None:
        """Copy a directory tree, keeping file modes (scripts stay executable)."""
        self.sftp.mkdir(remote)
        for entry in sorted(local.iterdir()):
            target = f"{remote}/{entry.name}"
            if entry.is_dir():
                self.upload_tree(entry, target)
            else:
                self.sftp.put(str(entry), target)
                self.sftp.chmod(target, stat.S_IMODE(entry.stat().st_mode))

    def makedirs(self, path: str) -> None:
        parts = PurePosixPath(path).parts
        for i in range(2, len(parts) + 1):
            partial = str(PurePosixPath(*parts[:i]))
            if not self.exists(partial):
                self.sftp.mkdir(partial)


class RemoteRun:
    """A run directory's copy on a submit host: submit it, and read its status back."""

    def __init__(self, run_dir: Path, options: SshOptions, remote_dir: str | None = None) -> None:
        self.run_dir = run_dir
        if not (run_dir / CONFIG_FILE).is_file():
            raise UserError(f"{run_dir}: not a run directory (no {CONFIG_FILE}); plan one first")
        self.remote_spec = remote_dir or default_remote_dir(run_dir)
        self.ssh = SshSession(options)
        self.remote = self.ssh.path(self.remote_spec)
        target = options.target
        self.label = f"{target.user + '@' if target.user else ''}{target.host}:{self.remote}"
        cache_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        key = hashlib.sha256(f"{target}{self.remote}".encode()).hexdigest()[:12]
        self.cache = cache_root / "dagtrain" / "remote" / f"{run_dir.name}-{key}"

    def __enter__(self) -> RemoteRun:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.ssh.close()

    def _check_tools(self) -> None:
        code, _, _ = self.ssh.run("command -v condor_submit_dag")
        if code != 0:
            raise UserError(
                f"condor_submit_dag is not found on {self.ssh.target.host} (for non-interactive "
                "SSH sessions): install HTCondor there, or put its bin directory on the PATH "
                "that sshd gives commands"
            )

    def _running_cluster(self) -> int | None:
        constraint = (
            f'JobUniverse == {SCHEDULER_UNIVERSE} && {ACTIVE_JOB} && Iwd == "{self.remote}"'
        )
        code, out, err = self.ssh.run(
            f"condor_q -constraint {shlex.quote(constraint)} -af ClusterId"
        )
        if code != 0:
            raise UserError(
                f"cannot reach the HTCondor schedd on {self.ssh.target.host}: {err.strip()}"
            )
        clusters = out.split()
        return int(clusters[0]) if clusters else None

    def _check_same_run(self) -> None:
        try:
            with self.ssh.sftp.open(f"{self.remote}/{CONFIG_FILE}") as handle:
                remote_config = handle.read()
        except OSError:
            remote_config = None
        if remote_config != (self.run_dir / CONFIG_FILE).read_bytes():
            raise UserError(
                f"{self.label} holds a different run; it is never overwritten. "
                "Choose another --remote-dir"
            )

    def _reopen_missing_nodes(self) -> None:
        """pipeline.rescue's resume step, on a local copy of the files it reads and writes."""
        with tempfile.TemporaryDirectory(prefix="dagtrain-rescue-") as tmp:
            mirror = Path(tmp)
            rescues = [
                a.filename for a in self.ssh.listdir(self.remote) if _RESCUE.match(a.filename)
            ]
            if not rescues:
                return
            copied = [CONFIG_FILE, *rescues, *self._small_files(("round.json",), (MISSING_MARK,))]
            for relative in copied:
                (mirror / relative).parent.mkdir(parents=True, exist_ok=True)
                self.ssh.sftp.get(f"{self.remote}/{relative}", str(mirror / relative))
            newest = max(rescues)
            before = (mirror / newest).read_bytes()
            reopen_missing_nodes(mirror)
            if (mirror / newest).read_bytes() != before:
                self.ssh.sftp.put(str(mirror / newest), f"{self.remote}/{newest}")
            for relative in copied:
                if relative.endswith(MISSING_MARK) and not (mirror / relative).exists():
                    self.ssh.sftp.remove(f"{self.remote}/{relative}")

    def _upload(self) -> None:
        """Copy the run under a temporary name, then rename: a half copy never looks like a run."""
        staging = f"{self.remote}.partial-{os.getpid()}"
        try:
            self.ssh.makedirs(str(PurePosixPath(self.remote).parent))
            self.ssh.upload_tree(self.run_dir, staging)
            self.ssh.sftp.posix_rename(staging, self.remote)
        except OSError as exc:
            self.ssh.run(f"rm -rf {shlex.quote(staging)}")
            raise UserError(f"cannot copy {self.run_dir} to {self.label}: {exc}") from None

    def submit(self, maxjobs: int | None = None, maxidle: int | None = None) -> int:
        """Copy the run (first time only) and submit it there; returns DAGMan's cluster id."""
        check_run_dir(self.run_dir)
        options = dag_options(maxjobs, maxidle)
        self._check_tools()
        if self.ssh.exists(self.remote):
            self._check_same_run()
            self.fetch()
            check_not_finished(self.cache)
            cluster = self._running_cluster()
            if cluster is not None:
                raise UserError(
                    f"{self.label}: already submitted and still running as DAGMan job {cluster}"
                )
            self._reopen_missing_nodes()
        else:
            check_not_finished(self.run_dir)
            self._upload()
        flags = " ".join(f"-{key} {value}" for key, value in options.items())
        code, out, err = self.ssh.run(f"condor_submit_dag {flags} {DAG_FILE}", cwd=self.remote)
        found = _SUBMITTED.search(out)
        if code != 0 or not found:
            detail = (err.strip() or out.strip()).splitlines()[-3:]
            raise UserError(f"condor_submit_dag failed on {self.label}: {' '.join(detail)}")
        return int(found.group(1))

    def _small_files(self, round_files: tuple[str, ...], node_files: tuple[str, ...]) -> list[str]:
        """Relative paths of the named files that exist under rounds/ on the remote side."""
        found = []
        for round_entry in self.ssh.listdir(f"{self.remote}/rounds"):
            base = f"rounds/{round_entry.filename}"
            for entry in self.ssh.listdir(f"{self.remote}/{base}"):
                if stat.S_ISDIR(entry.st_mode or 0):
                    found += [
                        f"{base}/{entry.filename}/{node.filename}"
                        for node in self.ssh.listdir(f"{self.remote}/{base}/{entry.filename}")
                        if node.filename in node_files
                    ]
                elif entry.filename in round_files:
                    found.append(f"{base}/{entry.filename}")
        return found

    def fetch(self) -> Path:
        """Bring the cache up to date with the remote run; unchanged files are not copied."""
        if not self.ssh.exists(self.remote):
            raise UserError(
                f"{self.label}: no such directory; submit the run with --remote first "
                "(and the same --remote-dir, if you gave one)"
            )
        wanted = [CONFIG_FILE, STATUS_FILE, REPORT_FILE]
        wanted += self._small_files(_ROUND_FILES, _NODE_FILES)
        keep = set()
        for relative in wanted:
            try:
                attrs = self.ssh.sftp.stat(f"{self.remote}/{relative}")
            except FileNotFoundError:
                continue
            local = self.cache / relative
            keep.add(local)
            current = local.stat() if local.is_file() else None
            if current and (current.st_size, int(current.st_mtime)) == (
                attrs.st_size,
                attrs.st_mtime,
            ):
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            self.ssh.sftp.get(f"{self.remote}/{relative}", str(local))
            os.utime(local, (attrs.st_atime or 0, attrs.st_mtime or 0))
        for stale in [p for p in self.cache.rglob("*") if p.is_file() and p not in keep]:
            stale.unlink()
        return self.cache

    def status(self) -> RunStatus:
        return read_status(self.fetch())


def submit_remote(
    run_dir: Path,
    options: SshOptions,
    remote_dir: str | None = None,
    maxjobs: int | None = None,
    maxidle: int | None = None,
) -> tuple[int, str]:
    """Submit on the submit host; returns DAGMan's cluster id and where the run lives there."""
    with RemoteRun(run_dir, options, remote_dir) as remote:
        return remote.submit(maxjobs, maxidle), remote.label


def status_remote(run_dir: Path, options: SshOptions, remote_dir: str | None = None) -> RunStatus:
    with RemoteRun(run_dir, options, remote_dir) as remote:
        return remote.status()
