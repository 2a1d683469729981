"""The warm interpreter: a Python that imports torch once, then forks one child per job.

The local runner starts it as `PYTHON -c <this file's text> FD` (see warm_pool), so nothing of
dagtrain is on its path: a child imports the job's payload from the job's own dagtrain.pyz, as
`python dagtrain.pyz ...` would. Standard library only, besides the payload's dependencies.

Protocol, over the SOCK_SEQPACKET socket FD: the server sends b"R" once it has imported torch;
then each request is one JSON record {argv, cwd, env} with four file descriptors: the job's
own socket, its stdin, stdout and stderr. On the job's socket the server answers b"P<pid>" when
the child runs and b"X<wait status>" when it has been reaped; the runner may send b"K<signal>"
to signal the child's process group. The runner closing the job's socket kills the group; the
runner closing FD ends the server.

No tensor operation runs here before a fork: torch starts its thread pools on the first one,
and a forked child would inherit a pool without its threads. The server imports torch, numpy and
safetensors, no more: a job's trainer (node_payload.sgd) never imports torch._dynamo.
"""

import atexit
import contextlib
import ctypes
import json
import os
import runpy
import select
import signal
import socket
import sys
import tempfile
import threading
import types

PR_SET_PDEATHSIG = 1
MAX_REQUEST = 1 << 20


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the server dies, so no job outlives it (the server dies with the runner)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def _exit_status(code: object) -> int:
    """What the interpreter exits with for SystemExit(code)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _report(exc: BaseException) -> None:
    """The traceback a fresh interpreter prints: from runpy down, without this frame."""
    traceback = exc.__traceback__
    sys.excepthook(type(exc), exc, traceback.tb_next if traceback else None)


def _run_payload(path: str) -> int:
    """Run the pyz's __main__ as `python PATH` does (its absolute path first on sys.path, then
    runpy's own entry point for a zip, in a fresh __main__), ending as the interpreter ends."""
    sys.path.insert(0, os.path.abspath(path))
    sys.modules["__main__"] = types.ModuleType("__main__")
    code = 0
    try:
        runpy._run_module_as_main("__main__", alter_argv=False)  # type: ignore[attr-defined]
    except SystemExit as exc:
        code = _exit_status(exc.code)
    except KeyboardInterrupt as exc:
        _report(exc)
        code = -signal.SIGINT
    except BaseException as exc:
        _report(exc)
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]  # non-daemon threads, as at exit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 120
    if code == -signal.SIGINT:  # the interpreter re-raises an uncaught Ctrl-C as the signal
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return code


def _child(request: dict, fds: list[int], server: int, inherited: list[int]) -> int:
    """In the forked child: become the job's process, as a starter would exec it."""
    os.setsid()
    _die_with_parent(server)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for fd in [*inherited, fds[0]]:
        os.close(fd)
    for target, fd in zip((0, 1, 2), fds[1:], strict=True):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    env = _with_coerced_locale(request["env"])
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # TMPDIR is the job's scratch directory
    _fresh_libraries(request["env"])
    sys.argv = list(request["argv"])
    return _run_payload(sys.argv[0])


def _with_coerced_locale(env: dict[str, str]) -> dict[str, str]:
    """A Python started in the C locale sets LC_CTYPE to a UTF-8 one (PEP 538), as the server
    did when it started: a fresh job's process would have done the same."""
    coerced = os.environ.get("LC_CTYPE")
    if not coerced or env.get("LC_ALL"):
        return env
    if (env.get("LC_CTYPE") or env.get("LANG") or "C") not in ("C", "POSIX"):
        return env
    return {**env, "LC_CTYPE": coerced}


def _fresh_libraries(env: dict[str, str]) -> None:
    """What a fresh interpreter would have taken from the job's environment or from entropy."""
    import numpy
    import torch

    threads = env.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:  # read by OpenMP when torch loads
        torch.set_num_threads(int(threads))
    numpy.random.seed()  # seeded from the OS at import; `random` reseeds itself after fork


class Server:
    """One thread, no tensors: forks a child per request and reports its status."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        # A running child -> its job socket; None once the runner's side has gone away.
        self.jobs: dict[int, socket.socket | None] = {}
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)

    def serve(self) -> None:
        while True:
            sockets = [s for s in self.jobs.values() if s is not None]
            watched = [self.control, self.wake_r, *sockets]
            readable = select.select(watched, [], [])[0]
            if self.wake_r in readable:
                os.read(self.wake_r, 4096)
            self._reap()
            for pid, sock in list(self.jobs.items()):
                if sock is not None and sock in readable:
                    self._job_message(pid, sock)
            if self.control in readable and not self._request():
                return

    def _request(self) -> bool:
        message, fds, _, _ = socket.recv_fds(self.control, MAX_REQUEST, 4)
        if not message:
            return False  # the runner closed its end (or died): the children die with us
        if len(fds) != 4:
            for fd in fds:
                os.close(fd)
            return True
        request = json.loads(message)
        sys.stdout.flush()
        sys.stderr.flush()
        inherited = [self.control.fileno(), self.wake_r, self.wake_w]
        inherited += [s.fileno() for s in self.jobs.values() if s is not None]
        server = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(request, fds, server, inherited)
            finally:
                os._exit(code)
        for fd in fds[1:]:
            os.close(fd)
        sock = socket.socket(fileno=fds[0])
        self.jobs[pid] = sock
        with contextlib.suppress(OSError):  # a runner side already gone: EOF, then the kill
            sock.send(b"P%d" % pid)
        return True

    def _job_message(self, pid: int, sock: socket.socket) -> None:
        try:
            message = sock.recv(64)
        except OSError:
            message = b""
        if message.startswith(b"K") and message[1:].isdigit():
            _signal_group(pid, int(message[1:]))
            return
        _signal_group(pid, signal.SIGKILL)  # the runner no longer waits for this job
        sock.close()
        self.jobs[pid] = None  # reaped later, with nobody to tell

    def _reap(self) -> None:
        while self.jobs:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            sock = self.jobs.pop(pid, None)
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                sock.send(b"X%d" % status)
            sock.close()


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def main() -> None:
    if sys.path and sys.path[0] == "":
        del sys.path[0]  # python -c puts the working directory first; a job does not have it
    control = socket.socket(fileno=int(sys.argv[1]))
    import numpy  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    control.send(b"R")  # ready: jobs start without importing these
    Server(control).serve()


if __name__ == "__main__":
    main()
