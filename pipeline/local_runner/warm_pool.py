"""Warm interpreters: payload jobs start in a fork of a Python that has already imported torch.

A job whose executable is one of the run's configured Pythons (not transferred) and whose first
argument is the payload, dagtrain.pyz, runs in a child of a warm server (warm_server.py), which
imported torch, numpy and safetensors once. The child becomes the job's process: its sandbox as
working directory, its arguments, environment and standard streams, its own process group, its
exit status; it imports the payload from the job's own dagtrain.pyz. Any other job
(the env_tarball wrapper, a script, a job whose environment sets PYTHON* variables, which a
Python reads as it starts) runs as a fresh process, as does every job when the server cannot
start (the Python lacks torch: the fresh process then reports why).

One server per Python serves all slots: forking costs milliseconds either way, and one server
holds torch's pages once, shared by its children. If it dies, the jobs it runs die with it (as
on a crashed machine) and fail; DAGMan's RETRY reruns them, and the next job starts a new server.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import IO

from pipeline.payload_zip import PAYLOAD_NAME

from .parent_death import die_with_runner

SERVER_SOURCE = Path(__file__).with_name("warm_server.py")
SERVER_LOG = "warm_server.err"
# A starter sets this one to request_cpus (job_process.THREAD_VARIABLES); every other PYTHON*
# variable is read as the interpreter starts, which a warm child cannot redo.
_STARTER_SET = frozenset({"PYTHON_CPU_COUNT"})
_CLOSE_GRACE = 5.0
# The base of a job's environment (job_process): what the server's interpreter starts with, so
# that what it decides at start-up (locale, stream encodings, OpenMP) is what a job's would.
_SERVER_ENVIRONMENT = {"PATH": "/usr/local/bin:/usr/bin:/bin"}


def warm_eligible(
    command: list[str], pythons: frozenset[str], cwd: Path, env: dict[str, str]
) -> bool:
    """Whether the job execs `PYTHON dagtrain.pyz ...` with a Python that may go warm (a
    transferred executable is the sandbox's copy, never one of them)."""
    return (
        command[0] in pythons
        and len(command) > 1
        and Path(command[1]).name == PAYLOAD_NAME
        and (cwd / command[1]).is_file()
        and not any(k.startswith("PYTHON") and k not in _STARTER_SET for k in env)
    )


class WarmJob:
    """A job running in a warm server's child, with what JobProcess needs of a process."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pid: int | None = None
        self.returncode: int | None = None
        self.note = ""  # why the job ended without an exit status of its own

    def _read(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.sock], [], [], left)[0]:
                return
            try:
                message = self.sock.recv(64)
            except OSError:
                message = b""
            if message.startswith(b"P"):
                self.pid = int(message[1:])
            elif message.startswith(b"X"):
                self._ended(os.waitstatus_to_exitcode(int(message[1:])))
            else:  # the server died: its children got SIGKILL with it (warm_server)
                self.note = "local runner: the warm interpreter running this job died\n"
                self._ended(-signal.SIGKILL)

    def _ended(self, returncode: int) -> None:
        self.returncode = returncode
        self.sock.close()

    def poll(self) -> int | None:
        self._read(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._read(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired("warm job", timeout or 0)
        return self.returncode

    def signal_group(self, sig: int) -> None:
        """Through the server while the child runs (it alone knows when the pid is free);
        afterwards, whatever the job left in its group, directly."""
        if self.returncode is None:
            with suppress(OSError):
                self.sock.send(b"K%d" % sig)
        elif self.pid is not None:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)


class _Server:
    """One warm server process, started by a thread that lives as long as it does, so that
    the server dies with the runner (parent_death: the kernel signals it when that thread
    ends)."""

    def __init__(self, python: str, work: Path) -> None:
        self.control, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.lock = threading.Lock()
        self.ready = False
        started = threading.Event()
        self.proc: subprocess.Popen[bytes] | None = None

        def serve() -> None:
            try:
                with (work / SERVER_LOG).open("ab") as log:
                    self.proc = subprocess.Popen(
                        [python, "-c", SERVER_SOURCE.read_text(), str(server_end.fileno())],
                        cwd=work, env=_SERVER_ENVIRONMENT,
                        stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                        pass_fds=[server_end.fileno()], start_new_session=True,
                        preexec_fn=die_with_runner(),
                    )  # fmt: skip
            except OSError:
                pass  # not alive: its jobs run as fresh processes, which report the error
            finally:
                server_end.close()
                started.set()
            if self.proc is not None:
                self.proc.wait()

        threading.Thread(target=serve, name=f"warm-{python}", daemon=True).start()
        started.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, cancel: threading.Event) -> bool:
        """Block until the server has imported torch; False if it died first or we stop."""
        with self.lock:
            while not self.ready and self.alive() and not cancel.is_set():
                if select.select([self.control], [], [], 0.1)[0]:
                    self.ready = self.control.recv(16) == b"R"
                    if not self.ready:
                        break
            return self.ready

    def submit(self, request: dict, streams: list[int]) -> WarmJob | None:
        runner_end, job_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with self.lock:
                socket.send_fds(
                    self.control, [json.dumps(request).encode()], [job_end.fileno(), *streams]
                )
        except OSError:
            runner_end.close()
            return None
        finally:
            job_end.close()
        return WarmJob(runner_end)

    def close(self) -> None:
        self.control.close()  # the server ends when its control socket closes
        if self.proc is not None:
            try:
                self.proc.wait(timeout=_CLOSE_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # its children ask for SIGKILL when it dies (warm_server)
                self.proc.wait()


class WarmPool:
    """Warm servers for the run's configured Pythons, each started when a job first needs it."""

    def __init__(self, pythons: frozenset[str], work: Path) -> None:
        self.pythons = pythons
        self.work = work
        self.servers: dict[str, _Server] = {}
        self.refused: set[str] = set()  # Pythons whose server died before it was ready
        self.lock = threading.Lock()

    def start(
        self,
        command: list[str],
        cwd: Path,
        env: dict[str, str],
        streams: tuple[IO[bytes] | int, IO[bytes] | int],
        cancel: threading.Event,
    ) -> WarmJob | None:
        """The job started in a warm child, or None: run it as a fresh process."""
        python = command[0]
        if python in self.refused or not warm_eligible(command, self.pythons, cwd, env):
            return None
        server = self._server(python)
        if not server.wait_ready(cancel):
            if not cancel.is_set():
                self.refused.add(python)
            return None
        with open(os.devnull, "rb") as stdin, open(os.devnull, "wb") as null:
            fds = [stdin.fileno(), *(s if isinstance(s, int) else s.fileno() for s in streams)]
            fds = [null.fileno() if fd == subprocess.DEVNULL else fd for fd in fds]
            request = {"argv": command[1:], "cwd": str(cwd), "env": env}
            return server.submit(request, fds)

    def _server(self, python: str) -> _Server:
        with self.lock:
            server = self.servers.get(python)
            if server is None or not server.alive():
                if server is not None:
                    server.close()
                server = self.servers[python] = _Server(python, self.work)
            return server

    def close(self) -> None:
        with self.lock:
            for server in self.servers.values():
                server.close()
            self.servers.clear()
