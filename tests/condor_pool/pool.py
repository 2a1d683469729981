"""A personal HTCondor pool inside the Debian trixie root built by ``provision.sh``.

The daemons run chrooted as an unprivileged job user (HTCondor refuses to run jobs as root).
Every mount the pool needs (proc, /dev, host paths bound at the same absolute path) lives in a
private mount namespace owned by ``condor_master``: nothing propagates to the host, and the
mounts vanish with the last process of the pool, so a crashed test cannot leave them behind.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

DEFAULT_ROOT = Path(os.environ.get("DAGTRAIN_CONDOR_ROOT", "/var/lib/dagtrain/condor-root"))
JOB_USER = "condorjob"
PROVISION_SCRIPT = Path(__file__).with_name("provision.sh")
MARKER = ".dagtrain-provisioned"
HOST_TOOLS = ("unshare", "nsenter", "chroot", "mount")

# Runs as root inside the new mount namespace, then becomes condor_master (same pid).
_MASTER_SCRIPT = r"""
root=$1 uid=$2 gid=$3 config=$4
shift 4
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
for path; do mount --bind "$path" "$root$path"; done
exec chroot "$root" setpriv --reuid="$uid" --regid="$gid" --init-groups --reset-env \
    env CONDOR_CONFIG="$config" /usr/sbin/condor_master -f
"""


class PoolError(RuntimeError):
    """The pool could not be provisioned, started or driven."""


def reason_unavailable(root: Path = DEFAULT_ROOT) -> str | None:
    """Why a pool cannot be provisioned on this machine, or None if it looks possible."""
    if not sys.platform.startswith("linux"):
        return f"the condor pool harness needs Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return "the condor pool harness needs root (debootstrap, chroot, mount namespaces)"
    missing = [tool for tool in HOST_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing host tools: {', '.join(missing)}"
    provisioned = (root / MARKER).is_file()
    if not provisioned and not (shutil.which("debootstrap") or shutil.which("apt-get")):
        return "no debootstrap and no apt-get to install it"
    return None


def provision(root: Path = DEFAULT_ROOT) -> None:
    """Build the root once (about a minute), or check the cached one (well under a second)."""
    proc = subprocess.run(
        ["bash", str(PROVISION_SCRIPT), str(root)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise PoolError(f"provisioning {root} failed (exit {proc.returncode}):\n{tail}")


class CondorPool:
    """Start, drive and stop the personal pool; commands run inside the root as the job user."""

    def __init__(self, root: Path = DEFAULT_ROOT, user: str = JOB_USER) -> None:
        self.root = root
        self.user = user
        self.uid, self.gid, self.home = _passwd_entry(root, user)
        self.config = f"{self.home}/condor_config"
        self._log_dir = root / self.home.lstrip("/") / "condor" / "log"
        # Errors of mount/chroot/setpriv before condor_master has its own log.
        self._start_log = self._log_dir / "PoolStartLog"
        self._master: subprocess.Popen[bytes] | None = None
        self._clusters: dict[Path, int] = {}
        self._lock: IO[str] | None = None

    def start(self, binds: list[Path], timeout_s: float = 90) -> None:
        """Mount, start condor_master and wait until the startd's slot is visible.

        ``binds`` are absolute host paths that jobs need, mounted at the same path in the root.
        """
        if self._master is not None:
            raise PoolError("pool already started")
        # One pool per root: a second session waits here instead of killing this one's daemons.
        self._lock = (self.root / ".pool.lock").open("w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        atexit.register(self.stop)
        try:
            self._kill_strays()
            self._clear_queue()
            self._add_hostname()
            for path in binds:
                (self.root / path.relative_to("/")).mkdir(parents=True, exist_ok=True)
            unshare = ["unshare", "--mount", "--propagation", "private"]
            script = ["sh", "-euc", _MASTER_SCRIPT, "sh", str(self.root), str(self.uid)]
            with self._start_log.open("wb") as start_log:
                self._master = subprocess.Popen(
                    [*unshare, *script, str(self.gid), self.config, *map(str, binds)],
                    stdin=subprocess.DEVNULL,
                    stdout=start_log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self._wait_for_slot(timeout_s)
        except BaseException:
            self.stop()
            raise

    def run(
        self,
        cmd: Sequence[str],
        cwd: Path,
        as_user: bool = True,
        timeout_s: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in the pool's namespace and root, in ``cwd`` (a path inside the root)."""
        if self._master is None or self._master.poll() is not None:
            raise PoolError(f"condor_master is not running\n{self.daemon_log_tail()}")
        user = [f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups"] if as_user else []
        enter = ["nsenter", f"--target={self._master.pid}", "--mount", "chroot", str(self.root)]
        environment = ["env", f"--chdir={cwd}", f"CONDOR_CONFIG={self.config}"]
        return subprocess.run(
            [*enter, "setpriv", *user, "--reset-env", *environment, *cmd],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def submit_dag(self, dag: Path, extra_args: Sequence[str] = ()) -> int:
        """Submit ``dag`` with condor_submit_dag from its directory; return DAGMan's cluster id."""
        proc = self.run(["condor_submit_dag", *extra_args, dag.name], cwd=dag.parent)
        found = re.search(r"submitted to cluster (\d+)", proc.stdout)
        if proc.returncode != 0 or not found:
            raise PoolError(f"condor_submit_dag {dag} failed:\n{proc.stdout}\n{proc.stderr}")
        self._clusters[dag] = int(found.group(1))
        return self._clusters[dag]

    def wait_dag(self, dag: Path, timeout_s: float = 120) -> int:
        """Wait for the DAGMan job submitted for ``dag`` to exit; return its exit status."""
        cluster = self._clusters[dag]
        out = dag.with_name(dag.name + ".dagman.out")
        done = re.compile(rf"condor_scheduniv_exec\.{cluster}\.0 .*EXITING WITH STATUS (-?\d+)")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = out.is_file() and done.search(out.read_text(errors="replace"))
            if found:
                return int(found.group(1))
            time.sleep(0.5)
        queue = self.run(["condor_q", "-nobatch"], cwd=dag.parent).stdout
        raise PoolError(f"DAG {dag} (cluster {cluster}) not done after {timeout_s} s:\n{queue}")

    def start_sshd(
        self,
        port: int,
        authorized_key: str,
        environment: dict[str, str] | None = None,
        timeout_s: float = 10,
    ) -> SshServer:
        """Start OpenSSH's sshd inside the root, in the pool's namespace, on 127.0.0.1:port.

        It accepts ``authorized_key`` (one public key line) for the job user, whose commands
        get the pool's CONDOR_CONFIG (and ``environment``), so they see the condor tools as a
        submit host's user would. A fresh host key is generated per server; stop it with
        ``SshServer.stop``.
        """
        if self._master is None or self._master.poll() is not None:
            raise PoolError(f"condor_master is not running\n{self.daemon_log_tail()}")
        inside = Path(f"/run/dagtrain-sshd-{port}")  # as sshd sees it; root-owned, as it demands
        state = self.root / inside.relative_to("/")
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir(parents=True)
        (self.root / "run" / "sshd").mkdir(exist_ok=True)  # sshd's privilege separation dir
        keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{inside}/host_key"]
        made = self.run(keygen, cwd=Path("/"), as_user=False)
        if made.returncode != 0:
            raise PoolError(f"ssh-keygen failed: {made.stderr}")
        (state / "authorized_keys").write_text(authorized_key.strip() + "\n")
        options = {
            "ListenAddress": "127.0.0.1",
            "HostKey": f"{inside}/host_key",
            "AuthorizedKeysFile": f"{inside}/authorized_keys",
            "AllowUsers": self.user,
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            "SetEnv": " ".join(
                f"{k}={v}" for k, v in {"CONDOR_CONFIG": self.config, **(environment or {})}.items()
            ),
            "PidFile": "none",
        }
        args = [f"-o{key}={value}" for key, value in options.items()]
        enter = ["nsenter", f"--target={self._master.pid}", "--mount", "chroot", str(self.root)]
        log = (state / "sshd.log").open("wb")
        process = subprocess.Popen(
            [*enter, "/usr/sbin/sshd", "-D", "-e", "-p", str(port), *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        server = SshServer(process, port, (state / "host_key.pub").read_text().strip(), state)
        deadline = time.monotonic() + timeout_s
        while not _port_open(port):
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise PoolError(f"sshd did not start on port {port}:\n{server.log()}")
            time.sleep(0.1)
        return server

    def own(self, path: Path) -> None:
        """Give ``path`` (recursively) to the job user, so jobs and DAGMan can write there."""
        for entry in [path, *path.rglob("*")]:
            os.chown(entry, self.uid, self.gid, follow_symlinks=False)

    def stop(self) -> None:
        """Shut the daemons down, then kill whatever still runs inside the root."""
        if self._lock is None:
            # Never started, or already stopped (atexit runs this again): the root may now hold
            # another session's pool, which its strays must not take down.
            return
        master, self._master = self._master, None
        if master is not None and master.poll() is None:
            # SIGQUIT: fast shutdown; a graceful one waits for claimed slots (30 s and more).
            master.send_signal(signal.SIGQUIT)
            try:
                master.wait(timeout=20)
            except subprocess.TimeoutExpired:
                master.kill()
                master.wait()
        self._kill_strays()
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def daemon_log_tail(self, lines: int = 15) -> str:
        """The last lines of each daemon log, for error messages."""
        parts = []
        for log in sorted(self._log_dir.glob("*Log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"== {log.name}\n" + "\n".join(tail))
        return "\n".join(parts) or f"(no daemon logs in {self._log_dir})"

    def _wait_for_slot(self, timeout_s: float) -> None:
        assert self._master is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._master.poll() is not None:
                raise PoolError(f"condor_master exited\n{self.daemon_log_tail()}")
            status = self.run(["condor_status", "-af", "Name"], cwd=Path("/"))
            if status.returncode == 0 and status.stdout.strip():
                return
            time.sleep(1)
        raise PoolError(f"no slot after {timeout_s} s\n{self.daemon_log_tail()}")

    def _add_hostname(self) -> None:
        """HTCondor tools warn unless the machine's hostname resolves inside the root."""
        hosts = self.root / "etc" / "hosts"
        text = hosts.read_text() if hosts.exists() else "127.0.0.1 localhost\n"
        name = socket.gethostname()
        if not any(name in line.split()[1:] for line in text.splitlines() if line.strip()):
            hosts.write_text(text.rstrip("\n") + f"\n127.0.1.1 {name}\n")

    def _clear_queue(self) -> None:
        """Start from an empty queue: jobs of an earlier session must not run in this one."""
        spool = self.root / self.home.lstrip("/") / "condor" / "spool"
        for journal in spool.glob("job_queue.log*"):
            journal.unlink()

    def _kill_strays(self) -> None:
        """Kill processes whose root is the pool's root (left over by a crashed session)."""
        root_id = _inode(self.root)
        for _ in range(50):
            strays = [pid for pid in _pids() if _inode(Path(f"/proc/{pid}/root")) == root_id]
            if not strays:
                return
            for pid in strays:
                _kill(pid)
            time.sleep(0.1)
        raise PoolError(f"processes still running inside {self.root}: {strays}")


@dataclass
class SshServer:
    """An sshd started by ``CondorPool.start_sshd``."""

    process: subprocess.Popen[bytes]
    port: int
    host_key: str  # "ssh-ed25519 AAAA...": the public key, for a known_hosts line
    state: Path  # host key, authorized_keys and sshd.log, inside the root

    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_key}\n"

    def log(self) -> str:
        path = self.state / "sshd.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.state, ignore_errors=True)


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _passwd_entry(root: Path, user: str) -> tuple[int, int, str]:
    for line in (root / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3]), fields[5]
    raise PoolError(f"no user {user} in {root}; run {PROVISION_SCRIPT}")


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:  # the process exited, or the path does not exist
        return None
    return stat.st_dev, stat.st_ino


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
