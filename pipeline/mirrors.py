"""Read-only FTP mirrors of a dataset directory, served in-process on loopback.

Local runs and tests need mirrors without an FTP daemon. Each server runs its own pyftpdlib IO
loop on its own thread, so one mirror can be stopped without disturbing the others (pyftpdlib's
ThreadedFTPServer shares one stop flag among all its instances) and stopping takes one poll tick.

The mirrors know `RANG start end` (draft-bryan-ftp-range): a node announces where a read ends,
and the mirror stops there instead of streaming on until the node closes the data connection.
They also take `MRNG start end [start end ...]`, which appends ranges to the next RETR: a node
reads the scattered blocks of a shard in one transfer instead of one per range.

Mirrors of a run also serve its global models, read-only, at published/RUN_ID/ (the path a
model's pointer names, node_payload/common/model_pointer.py): that folder maps onto the run's
models/ folder, where only the global_rNNN.safetensors files and their deltas delta_rNNN are
visible (never the server optimizer's state), so a model is published the moment its atomic
write renames it into place; and the run's job payload, payload/dagtrain.pyz, beside them.
"""

import errno
import json
import logging
import os
import re
import socket
import threading
from pathlib import Path
from typing import Any, ClassVar

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.filesystems import AbstractedFS
from pyftpdlib.handlers import DTPHandler, FTPHandler
from pyftpdlib.ioloop import IOLoop
from pyftpdlib.servers import FTPServer
from rich.console import Console

from node_payload.common.errors import UserError
from node_payload.common.run_layout import PAYLOAD_DIR, PAYLOAD_NAME, PUBLISHED_DIR

HOST = "127.0.0.1"
POLL_S = 0.05  # longest wait of close() for a server thread to notice the stop request
MANIFEST = "manifest.json"


def free_ports(k: int) -> list[int]:
    """k distinct loopback ports that were free a moment ago (held together so they differ)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(k)]
    try:
        for sock in socks:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


MAX_RANGES = 1024  # ranges one client may queue for its next RETR: all it can make a mirror hold
MAX_OFFSET = 2**63 - 1  # the largest file offset the OS takes; a range past it is refused
MULTI_RANGE = "MRNG"  # appends ranges to the next RETR; announced in FEAT as "MRNG <max ranges>"
_OFFSET = re.compile(r"[0-9]{1,19}")


def parse_ranges(line: str) -> list[tuple[int, int]] | None:
    """`start end [start end ...]` (inclusive ends) as half-open (start, end + 1) ranges, or
    None when any of them is malformed."""
    parts = line.split()
    if not parts or len(parts) % 2 or not all(_OFFSET.fullmatch(part) for part in parts):
        return None
    ranges = [(int(a), int(b) + 1) for a, b in zip(parts[::2], parts[1::2], strict=True)]
    return ranges if all(start < end <= MAX_OFFSET + 1 for start, end in ranges) else None


class _RangeProducer:
    """A RETR's file producer that sends the announced ranges in turn (the send() path).

    The file stands at the first range's start; an end of file inside a range ends the transfer.
    """

    def __init__(self, producer: Any, spans: list[tuple[int, int]]) -> None:
        self._producer = producer
        self.file = producer.file
        self.spans = spans
        self._k = 0

    def more(self) -> bytes:
        while self._k < len(self.spans):
            left = self.spans[self._k][1] - self.file.tell()
            if left > 0:
                return self._producer.more()[:left]
            self._k += 1
            if self._k < len(self.spans):
                self.file.seek(self.spans[self._k][0])
        return b""


class RangeDTPHandler(DTPHandler):
    """Data channel that sends a RETR's ranges in turn and ends after the last (sendfile path).

    One writable event sends up to DTPHandler.ac_out_buffer_size bytes, as for a whole file,
    over as many ranges as that takes: a range of a few KB does not cost a pass of the IO loop.
    """

    _spans: list[tuple[int, int]] | None = None
    _k = 0

    def push_with_producer(self, producer: Any) -> None:
        self._spans = getattr(producer, "spans", None)
        super().push_with_producer(producer)

    def initiate_sendfile(self) -> None:
        spans = self._spans
        if spans is None:
            super().initiate_sendfile()
            return
        budget = DTPHandler.ac_out_buffer_size
        while True:
            while self._offset >= spans[self._k][1] and self._k + 1 < len(spans):
                self._k += 1
                self._offset = spans[self._k][0]
            asked = max(0, min(budget, spans[self._k][1] - self._offset))
            self.ac_out_buffer_size = asked  # sendfile of 0 bytes reads as end of file: 226
            before = self._offset
            super().initiate_sendfile()
            sent = self._offset - before
            budget -= sent
            if sent == 0 or sent < asked or budget <= 0:  # done, socket full or turn used
                return


class RangeFTPHandler(FTPHandler):
    """FTPHandler with `RANG start end` (inclusive end), announced in FEAT as `RANG STREAM`.

    A range applies to the next RETR only; REST forgets it. Clients that never send RANG see a
    plain FTP server.
    """

    dtp_handler = RangeDTPHandler
    proto_cmds: ClassVar[dict[str, dict[str, Any]]] = {
        **FTPHandler.proto_cmds,
        "RANG": {
            "perm": None,
            "auth": True,
            "arg": True,
            "help": "Syntax: RANG <SP> start <SP> end (byte range of the next RETR).",
        },
    }
    features: ClassVar[tuple[str, ...]] = ("RANG STREAM",)
    _spans: list[tuple[int, int]] | None = None  # the next RETR's ranges, half-open

    def ftp_FEAT(self, line: str) -> None:
        for feature in self.features:
            if feature not in self._extra_feats:
                self._extra_feats.append(feature)
        super().ftp_FEAT(line)

    def _ranges(self, command: str, line: str, most: int) -> list[tuple[int, int]] | None:
        """The command's 1 to `most` ranges, or None after answering why they are refused."""
        if self._current_type == "a":
            self.respond("501 Ranges are not allowed in ASCII mode.")
            return None
        spans = parse_ranges(line)
        if spans is None or len(spans) > most:
            pairs = "<start> <end>" if most == 1 else "<start> <end> pairs"
            self.respond(f"501 Expected {command} {pairs}, 0 <= start <= end < 2^63.")
            return None
        return spans

    def ftp_RANG(self, line: str) -> None:
        spans = self._ranges("RANG", line, 1)
        if spans is not None:
            self._spans = spans
            self.respond(f"350 Restarting at {spans[0][0]}. Ending at {spans[0][1] - 1}.")

    def ftp_REST(self, line: str) -> None:
        self._spans = None
        super().ftp_REST(line)

    def ftp_RETR(self, file: str) -> str | None:
        if self._spans:
            self._restart_position = self._spans[0][0]
        try:
            return super().ftp_RETR(file)
        finally:
            self._spans = None  # also when the RETR failed

    def push_dtp_data(
        self, data: Any, isproducer: bool = False, file: Any = None, cmd: str | None = None
    ) -> None:
        if cmd == "RETR" and self._spans:
            data = _RangeProducer(data, self._spans)
        super().push_dtp_data(data, isproducer, file, cmd)


class MultiRangeFTPHandler(RangeFTPHandler):
    """RangeFTPHandler with `MRNG start end [start end ...]` (inclusive ends), which appends
    ranges to the next RETR: the RETR sends its ranges concatenated, in the order asked, on one
    data connection.

    A node reading many small blocks of a shard pays one data connection and one transfer reply
    for all of them instead of one per range, and one command and reply per line of ranges.
    RANG starts the list afresh (one range), REST and every RETR clear it. A client may queue at
    most MAX_RANGES ranges (announced in FEAT as `MRNG <max>`), and the ranges are all the
    mirror holds for it: a line that would go beyond gets a 552 and adds none of its ranges.
    """

    proto_cmds: ClassVar[dict[str, dict[str, Any]]] = {
        **RangeFTPHandler.proto_cmds,
        MULTI_RANGE: {
            "perm": None,
            "auth": True,
            "arg": True,
            "help": f"Syntax: {MULTI_RANGE} <SP> start <SP> end [...] (adds ranges to the next RETR).",
        },
    }
    features = (*RangeFTPHandler.features, f"{MULTI_RANGE} {MAX_RANGES}")

    def ftp_MRNG(self, line: str) -> None:
        queued = len(self._spans or ())
        spans = self._ranges(MULTI_RANGE, line, MAX_RANGES)
        if spans is None:
            return
        if queued + len(spans) > MAX_RANGES:
            self.respond(f"552 At most {MAX_RANGES} ranges per RETR.")
            return
        self._spans = [*(self._spans or ()), *spans]
        self.respond(f"350 Ranges {queued + 1} to {queued + len(spans)} of the next RETR.")


_GLOBAL_MODEL = re.compile(r"(global|delta)_r[0-9]{3,}\.safetensors")


def run_models_fs(run_id: str, models_dir: Path) -> type[AbstractedFS]:
    """A file system whose published/RUN_ID/ shows the global models and deltas of models_dir,
    and the job payload of its run directory."""
    virtual = f"/{PUBLISHED_DIR}/{run_id}/"
    models = os.path.realpath(models_dir)
    payload = os.path.join(os.path.dirname(models), PAYLOAD_DIR, PAYLOAD_NAME)

    class RunModelsFS(AbstractedFS):
        def ftp2fs(self, ftppath: str) -> str:
            path = self.ftpnorm(ftppath)
            name = path[len(virtual) :]
            if path.startswith(virtual) and _GLOBAL_MODEL.fullmatch(name):
                return os.path.join(models, name)
            if path == virtual + PAYLOAD_NAME:
                return payload
            return super().ftp2fs(ftppath)

        def validpath(self, path: str) -> bool:
            real = os.path.realpath(path)
            published = os.path.dirname(real) == models
            return (
                super().validpath(path)
                or (published and bool(_GLOBAL_MODEL.fullmatch(os.path.basename(real))))
                or real == os.path.realpath(payload)
            )

    return RunModelsFS


def read_only_handler(
    root: Path,
    base: type[FTPHandler] = MultiRangeFTPHandler,
    fs: type[AbstractedFS] | None = None,
) -> type[FTPHandler]:
    """A handler class for anonymous, list-and-retrieve-only access to root (through `fs` when
    given; otherwise through the base handler's own file system, which test mirrors replace).

    A fresh subclass per server: pyftpdlib configures handlers through class attributes.
    Passive data ports are left to the kernel, which always works on loopback.
    """
    authorizer = DummyAuthorizer()
    authorizer.add_anonymous(str(root), perm="elr")
    attributes: dict[str, object] = {"authorizer": authorizer}
    if fs is not None:
        attributes["abstracted_fs"] = fs
    return type(f"ReadOnly{base.__name__}", (base,), attributes)


def _quiet_logging() -> None:
    """Keep pyftpdlib's per-connection chatter out of the user's terminal.

    Its IO loop installs an INFO stderr handler on first use unless the logger has one already.
    """
    logger = logging.getLogger("pyftpdlib")
    logger.setLevel(logging.WARNING)
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())


class MirrorServer:
    """One FTP server on 127.0.0.1 (port 0: any free port) with its own IO loop and thread."""

    def __init__(self, handler: type[FTPHandler], port: int = 0) -> None:
        _quiet_logging()
        self._ioloop = IOLoop()
        try:
            self._server = FTPServer((HOST, port), handler, ioloop=self._ioloop)
        except OSError as exc:
            self._ioloop.close()
            cause = exc.args[0] if exc.args and isinstance(exc.args[0], OSError) else exc
            if cause.errno == errno.EADDRINUSE:  # pyftpdlib wraps the bind() error
                raise UserError(
                    f"port {port} on {HOST} is already in use: choose other mirror ports "
                    "or stop the program that listens there"
                ) from None
            raise
        self.port: int = self._server.address[1]
        self.url = f"ftp://{HOST}:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"ftp-mirror-{self.port}")
        self._thread.start()

    def _serve(self) -> None:
        try:
            while not self._stop.is_set() and self._ioloop.socket_map:
                self._ioloop.loop(timeout=POLL_S, blocking=False)
        finally:
            self._ioloop.close()  # in this thread: the loop's sockets are not thread-safe

    def stop(self) -> None:
        """Ask the server to stop, without waiting."""
        self._stop.set()

    def close(self) -> None:
        self.stop()
        self._thread.join()


class EmbeddedMirrors:
    """Several read-only mirrors of one dataset directory; a context manager that stops them."""

    def __init__(self, servers: list[MirrorServer]) -> None:
        self._servers = servers

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self._servers]

    def close(self) -> None:
        for server in self._servers:
            server.stop()  # all stop together, then wait: one poll tick in total
        for server in self._servers:
            server.close()

    def __enter__(self) -> "EmbeddedMirrors":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dataset_root(dataset_dir: Path) -> Path:
    root = Path(dataset_dir).resolve()
    if not (root / MANIFEST).is_file():
        raise UserError(
            f"{dataset_dir}: not a dataset directory (no {MANIFEST}); prepare the dataset first"
        )
    return root


def serve(
    dataset_dir: Path,
    ports: list[int] | None = None,
    k: int = 2,
    run_models: tuple[str, Path] | None = None,
) -> EmbeddedMirrors:
    """Start mirrors of dataset_dir: one per port in ports, else k on free ports; with
    `run_models` (a run id and its models/ folder), they serve that run's global models too."""
    root = _dataset_root(dataset_dir)
    fs = run_models_fs(*run_models) if run_models else AbstractedFS
    if ports is None:
        if k < 1:
            raise UserError(f"number of mirrors must be at least 1, got {k}")
        ports = [0] * k
    servers: list[MirrorServer] = []
    try:
        for port in ports:
            servers.append(MirrorServer(read_only_handler(root, fs=fs), port))
    except BaseException:
        EmbeddedMirrors(servers).close()
        raise
    return EmbeddedMirrors(servers)


def _block() -> None:
    threading.Event().wait()


def serve_forever(dataset_dir: Path, k: int, ports: list[int] | None = None) -> None:
    """`dagtrain serve`: print the mirror URLs, serve until Ctrl-C."""
    console = Console()
    with serve(dataset_dir, ports, k) as mirrors:
        console.print(f"Serving [bold]{dataset_dir}[/] read-only on {len(mirrors.urls)} mirrors.")
        console.print("Put this in the [bold]\\[data][/] table of the run config:")
        console.print(f"mirrors = {json.dumps(mirrors.urls)}", markup=False)
        console.print("Press Ctrl-C to stop.")
        try:
            _block()
        except KeyboardInterrupt:
            console.print("Stopped.")
