"""Fetch dataset bytes from FTP mirrors: coalesced byte ranges, hash checks, mirror failover.

Runs on execute nodes that only have Python and torch, hence plain ftplib. A node needs a few
hundred small fragments scattered over large shards. A mirror that takes several byte ranges per
`RETR` (`MRNG`, pipeline/mirrors.py) sends a shard's needed ranges in one transfer; from any other
mirror neighbouring fragments are read with one `REST` + `RETR` that stops after the needed bytes.
Either way, over one control connection per mirror.
Any fault of a mirror (refused, silent, dropped, truncated or wrong bytes) moves the affected
reads to other mirrors, spread over all of them so that no single neighbour takes a failed
mirror's whole load; after every mirror failed a read, the node pauses (exponential backoff with
jitter, so that many nodes do not retry in step) and tries again; only after PASSES such passes
does it give up with DataUnreachable, which the node turns into a retryable exit code.

Mirrors are untrusted: no size a mirror claims is believed beyond what the manifest can need
(a byte range is read to its manifest length and no further, a manifest to MAX_MANIFEST_BYTES),
and a manifest's buffer grows with the bytes that arrive. A mirror caught lying (an impossible
SIZE, another manifest than the planned one) is named once and not asked again by that fetch.
"""

import logging
import random
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ftplib import (
    FTP,
    all_errors,
    error_perm,
    error_proto,
    error_reply,
    error_temp,
    parse227,
    parse229,
)
from hashlib import sha256
from operator import attrgetter

from node_payload.common.errors import UserError
from node_payload.common.manifest import Block as Fragment  # fetched units are stored blocks
from node_payload.common.manifest_limits import MAX_MANIFEST_BYTES
from node_payload.common.mirror_url import Mirror

log = logging.getLogger(__name__)

# A gap between two needed ranges is read through, instead of starting another read, only when
# it is small against a read's own cost (a command round trip and a new data connection: about
# 0.5 ms of the mirror's CPU, some 500 KB on loopback, 64 KB at 1 Gbit/s, more over a WAN) and
# while all the bytes read through stay within MAX_WASTE of the needed bytes, smallest gaps
# first: a node never downloads more than 1 + MAX_WASTE times what it needs.
MAX_GAP = 64 * 1024
MAX_WASTE = 1 / 10
# A read's buffer is its planned bytes (from the manifest, never from the mirror): MAX_SPAN bounds
# it and the bytes wasted when a read fails. Reads of up to 1024 ranges and 32 MiB (a lane's part
# of a shard in one read) are no faster, on loopback or at 1 Gbit/s (benchmarks/bench_fetch.py).
MAX_SPAN = 8 * 1024 * 1024
MAX_RANGES = 256  # ranges of one multi-range read: its commands fit in one write of some 8 KB
RANGES_PER_LINE = 32  # ranges per MRNG command: lines under 1300 bytes, few replies
PASSES = 3  # every mirror gets more chances, after pauses, before a read is given up
BACKOFF_S = 0.5  # pause before the second pass, doubled for each later one
BACKOFF_MAX_S = 8.0  # bounded: DAGMan retries the whole node (on another mirror) for long outages
WINDOW_MIN, WINDOW_MAX = 4 * 1024, 4 * 1024 * 1024
_EARLY_CLOSE = ("426", "451")  # replies of a server whose transfer the client closed on purpose
# Real servers answer in a few lines (FEAT, a banner); a reply that runs on is not buffered.
MAX_REPLY = 64 * 1024
CHUNK = 2**20  # receive size of a whole-file read: few calls, and memory follows what arrives
RECV = 256 * 1024  # receive size of a range read: hashed while the bytes are still in the cache
_SIZE_REPLY = re.compile(r"213 ([0-9]{1,30})")
_PLACE = attrgetter("offset", "length")  # fragments in shard order


@dataclass
class FetchStats:
    """What a node downloaded, reported in its metrics to spot slow or faulty mirrors."""

    bytes_downloaded: int = 0
    failovers: int = 0
    per_mirror_bytes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


class DataUnreachable(Exception):
    """Every mirror failed for some item: the node should exit with a retryable code."""


class _BadData(Exception):
    """The mirror answered, but with the wrong bytes; its session stays usable."""


class MirrorLied(_BadData):
    """The mirror claimed what cannot be: no later read of the same fetch asks it again."""


class LoginRefused(error_perm):
    """The mirror refused the URL's user and password (530): a config error, not an outage."""


def backoff_delay(passed: int, base_s: float = BACKOFF_S) -> float:
    """Pause after `passed` failed passes: base_s doubled per pass, capped, times 0.5 to 1.

    The jitter keeps the nodes of a round, which all saw the same outage, from retrying in step.
    """
    return min(BACKOFF_MAX_S, base_s * 2 ** (passed - 1)) * random.uniform(0.5, 1.0)


def _window(length: int) -> int:
    """Receive buffer for a read of `length` bytes from a server that knows no range end.

    RETR has no end offset: the mirror streams on until the node closes the connection, and
    whatever the node's receive window lets in beyond the read is sent for nothing (with
    Linux's autotuned windows, 6x the bytes needed on loopback). Linux doubles the value asked
    for, so half the read gives a buffer about the read's size: 1.3x on the wire, no slower.
    """
    return min(max(length // 2, WINDOW_MIN), WINDOW_MAX)


class _RangeFTP(FTP):
    """ftplib with byte-range reads over passive data connections.

    A server that lists `RANG STREAM` in FEAT (draft-bryan-ftp-range, as the embedded mirrors
    do) is told where a read ends and stops there, with PASV, RANG and RETR sent together; one
    that lists `MRNG <max>` as well is sent up to `max` ranges (MRNG commands of up to
    RANGES_PER_LINE ranges each) for one RETR, and sends them concatenated on one data
    connection. Any other server gets `REST` and a receive window the size of the read, which
    bounds what it sends past the end before the node closes. Commands to such a server wait for
    each reply, as most clients do: not every server reads commands ahead.
    """

    ranged = False
    max_ranges = 1  # ranges one RETR may carry: up to MAX_RANGES on a server listing MRNG

    def getmultiline(self) -> str:
        """ftplib's reply reader, bounded: a server streaming reply lines would fill memory."""
        line = self.getline()
        if line[3:4] != "-":
            return line
        lines, size = [line], len(line)
        while True:
            nextline = self.getline()
            lines.append(nextline)
            size += len(nextline) + 1
            if nextline[:3] == line[:3] and nextline[3:4] != "-":
                return "\n".join(lines)
            if size > MAX_REPLY:
                raise error_proto(f"a reply of more than {MAX_REPLY} bytes")

    def claimed_size(self, path: str) -> int:
        """What SIZE says, parsed here: ftplib's int() of the reply raises a bare ValueError."""
        reply = self.sendcmd(f"SIZE {path}")
        match = _SIZE_REPLY.fullmatch(reply.strip())
        if not match:
            raise _BadData(f"no size for {path} (SIZE answered {reply[:80]!r})")
        return int(match[1])

    def learn_features(self) -> None:
        try:
            reply = self.sendcmd("FEAT")
        except error_perm:  # FEAT itself is an extension (RFC 2389)
            return
        features = [line.strip().upper().split() for line in reply.splitlines()[1:-1]]
        self.ranged = ["RANG", "STREAM"] in features
        announced = [f[1] for f in features if len(f) == 2 and f[0] == "MRNG" and f[1].isdigit()]
        if self.ranged and announced:  # int() of thousands of digits would raise: not parsed
            digits = announced[0]
            self.max_ranges = (
                MAX_RANGES if len(digits) > 6 else max(1, min(MAX_RANGES, int(digits)))
            )

    def _send_lines(self, *lines: str) -> None:
        """Commands in one write: the server reads them in order, as if each had been awaited."""
        if any(c in line for line in lines for c in "\r\n"):
            raise ValueError("an illegal newline character should not be contained")
        self.sock.sendall("".join(f"{line}\r\n" for line in lines).encode(self.encoding))

    def _reply_in_step(self, command: str, expected: str) -> str:
        """The reply to a command sent ahead of others: one that does not start with `expected`
        leaves the later commands' replies on their way and the control connection out of step,
        an error_proto, which ends the session like a broken one."""
        try:
            reply = self.getresp()
        except (error_perm, error_temp) as exc:
            raise error_proto(f"{command} refused: {exc}") from None
        if reply[0] != expected:
            raise error_proto(f"{command} answered {reply[:80]!r}")
        return reply

    def _data_socket(self, host: str, length: int) -> socket.socket:
        """An unconnected data socket; its receive buffer is set before connecting (the window a
        connection starts with is fixed by its handshake)."""
        conn = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        if not self.ranged:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _window(length))
        conn.settimeout(self.timeout)
        return conn

    def _transfer_started(self, resp: str) -> None:
        if resp[0] == "2":  # some servers answer 200 before 150
            resp = self.getresp()
        if resp[0] != "1":
            raise error_reply(resp)

    def open_ranges(self, path: str, ranges: list[tuple[int, int]]) -> socket.socket:
        """The data connection of a RETR that sends the (offset, length) ranges one after the
        other: several only to a server that takes that many (max_ranges)."""
        if len(ranges) == 1:
            return self.open_range(path, *ranges[0])
        if not 1 < len(ranges) <= self.max_ranges:
            raise ValueError(
                f"{len(ranges)} ranges in one read; this server takes {self.max_ranges}"
            )
        pairs = [f"{offset} {offset + length - 1}" for offset, length in ranges]
        commands = [
            f"MRNG {' '.join(pairs[k : k + RANGES_PER_LINE])}"
            for k in range(0, len(pairs), RANGES_PER_LINE)
        ]
        return self.open_announced(path, commands, sum(n for _, n in ranges))

    def open_range(self, path: str, offset: int, length: int) -> socket.socket:
        """The data connection of a RETR that starts at offset; ends at offset + length if the
        server knows RANG."""
        if self.ranged and length:
            return self.open_announced_range(path, offset, length)
        host, port = self.makepasv()
        conn = self._data_socket(host, length)
        try:
            conn.connect((host, port))
            if offset:
                self.sendcmd(f"REST {offset}")
            self._transfer_started(self.sendcmd(f"RETR {path}"))
        except BaseException:
            conn.close()
            raise
        return conn

    def open_announced_range(self, path: str, offset: int, length: int) -> socket.socket:
        """PASV (EPSV over IPv6), RANG and RETR in one write, then the data connection: a read
        of a ranged server waits for one round trip and a connect instead of three of them."""
        return self.open_announced(path, [f"RANG {offset} {offset + length - 1}"], length)

    def open_announced(self, path: str, ranges: list[str], length: int) -> socket.socket:
        """PASV (EPSV over IPv6), the range commands and RETR in one write, then the data
        connection.

        The server answers the passive address before it reads the ranges, and waits for the
        data connection before it answers RETR; a server that announced the range commands but
        answers out of step ends its session (error_proto), as with any broken session.
        """
        passive = "PASV" if self.af == socket.AF_INET else "EPSV"
        self._send_lines(passive, *ranges, f"RETR {path}")
        reply = self._reply_in_step(passive, "2")
        try:
            if passive == "PASV":
                _untrusted, port = parse227(reply)
                host = self.sock.getpeername()[0]  # never another host a reply names
            else:
                host, port = parse229(reply, self.sock.getpeername())
        except error_reply as exc:
            raise error_proto(f"{passive} answered {reply[:80]!r}") from exc
        conn = self._data_socket(host, length)
        try:
            conn.connect((host, port))
            for command in ranges:
                self._reply_in_step(command.partition(" ")[0], "3")
            self._transfer_started(self.getresp())
        except BaseException:
            conn.close()
            raise
        return conn


class _Session:
    """One logged-in control connection, reused for every read on its mirror."""

    def __init__(self, mirror: Mirror, stats: FetchStats, timeout_s: float) -> None:
        self.mirror = mirror
        self._stats = stats
        self._ftp = _RangeFTP(timeout=mirror.timeout_s or timeout_s)
        try:
            self._ftp.connect(mirror.host, mirror.port)
            self._login()
            self._ftp.voidcmd("TYPE I")
            self._ftp.learn_features()
        except BaseException:
            self._ftp.close()
            raise

    def _login(self) -> None:
        user = self.mirror.user or "anonymous"
        try:
            self._ftp.login(user, self.mirror.password)
        except error_perm as exc:
            if not str(exc).startswith("530"):
                raise
            raise LoginRefused(
                f"login as {user!r} refused ({exc}); check the user and password of this mirror "
                "in [data] mirrors"
            ) from None

    def read_file(self, path: str, limit: int) -> bytes:
        """The whole file, believing its SIZE only up to `limit`.

        Received chunk by chunk, not into a buffer of the claimed size: a mirror that claims
        much and sends little costs what it sent. Bytes past the SIZE are never read; a file cut
        short by a lying SIZE fails the caller's hash check.
        """
        claimed = self._ftp.claimed_size(self.mirror.remote(path))
        if claimed > limit:
            raise MirrorLied(f"SIZE says {path} is {claimed} bytes, more than {limit} allowed")
        parts: list[bytes] = []
        got = 0
        try:
            with self._ftp.open_range(self.mirror.remote(path), 0, claimed) as conn:
                while got < claimed:
                    chunk = conn.recv(min(CHUNK, claimed - got))
                    if not chunk:
                        break
                    parts.append(chunk)
                    got += len(chunk)
        finally:
            self._count(got)
        self._end_read(path, offset=0, length=claimed, got=got)
        return b"".join(parts)

    @property
    def max_ranges(self) -> int:
        """How many ranges one read of this mirror may carry."""
        return self._ftp.max_ranges

    def read(
        self,
        path: str,
        ranges: list[tuple[int, int]],
        arrived: Callable[[memoryview, int], None] = lambda data, n: None,
    ) -> memoryview:
        """Exactly the bytes of the (offset, length) ranges, one after the other, in a buffer of
        their own, read-only; `arrived(data, n)` is told each time the first n bytes are in, so
        that they can be checked while the mirror sends the rest.

        The buffer is the read's alone, so that its verified blocks are handed on as views of it
        instead of copies (a copy of each block cost as much as receiving it). Lengths come from
        the validated manifest (at most MAX_SPAN in all, or one block of plausible size), never
        from the mirror, and no byte past their sum is read.
        """
        length = sum(n for _, n in ranges)
        offset = ranges[0][0]
        view = memoryview(bytearray(length))
        done = view.toreadonly()  # what callers see: no one changes bytes once verified
        got = 0
        try:
            with self._ftp.open_ranges(self.mirror.remote(path), ranges) as conn:
                while got < length:
                    n = conn.recv_into(view[got:], min(RECV, length - got))
                    if n == 0:
                        break
                    got += n
                    arrived(done, got)
        finally:
            self._count(got)
        self._end_read(path, offset, length, got)
        return done

    def _end_read(self, path: str, offset: int, length: int, got: int) -> None:
        """The transfer's reply: an early close is fine once every byte asked for arrived."""
        try:
            self._ftp.voidresp()
        except error_temp as exc:
            if got < length or not str(exc).startswith(_EARLY_CLOSE):
                raise
        if got < length:
            raise _BadData(f"{path}: got {got} of {length} bytes from offset {offset}")

    def _count(self, n: int) -> None:
        self._stats.bytes_downloaded += n
        per_mirror = self._stats.per_mirror_bytes
        per_mirror[self.mirror.label] = per_mirror.get(self.mirror.label, 0) + n

    def close(self) -> None:
        self._ftp.close()


@dataclass
class _Task:
    """One read to get done on some mirror; `run` raises on any fault of that mirror."""

    what: str
    order: list[int]  # mirror indices in the order to try them, once per pass
    run: Callable[[_Session], None]
    errors: list[str] = field(default_factory=list)


def _order(start: int, n: int, salt: int) -> list[int]:
    """Mirror `start` first, then the others rotated by `salt` (the task's index).

    Rotating per task sends the reads of a failed mirror to all the other mirrors in turn rather
    than all to its neighbour, which would then carry twice its share.
    """
    others = [(start + 1 + i) % n for i in range(n - 1)]
    k = salt % len(others) if others else 0
    return [start % n, *others[k:], *others[:k]]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return "connection closed by the mirror"
    return str(exc) or type(exc).__name__


class _Pool:
    """Sessions by mirror index. A mirror whose connection broke (refused, timed out, dropped)
    is skipped for the rest of an attempt, so a silent mirror costs one timeout, not one per read.
    """

    def __init__(self, mirrors: list[Mirror], stats: FetchStats, timeout_s: float) -> None:
        self.mirrors = mirrors
        self._stats = stats
        self._timeout_s = timeout_s
        self._sessions: dict[int, _Session] = {}
        self._broken: dict[int, str] = {}
        self._lied: dict[int, str] = {}

    def run(self, task: _Task, m: int) -> str | None:
        """Run task on mirror m: None on success, else why it failed."""
        if m in self._lied:
            return f"skipped, it lied: {self._lied[m]}"
        if m in self._broken:
            return f"skipped, connection broke: {self._broken[m]}"
        try:
            if m not in self._sessions:
                self._sessions[m] = _Session(self.mirrors[m], self._stats, self._timeout_s)
            task.run(self._sessions[m])
        except MirrorLied as exc:
            reason = self._lied[m] = str(exc)
            self._sessions.pop(m).close()
            log.warning("mirror %s lied: %s; not asking it again", self.mirrors[m].label, reason)
            return reason
        except (_BadData, error_perm) as exc:
            if m not in self._sessions:
                return self._break(m, exc)
            # The mirror answered the read, wrongly: its session is still in sync.
            log.warning("mirror %s failed %s: %s", self.mirrors[m].label, task.what, exc)
            return _reason(exc)
        except all_errors as exc:
            return self._break(m, exc)
        return None

    def _break(self, m: int, exc: BaseException) -> str:
        reason = self._broken[m] = _reason(exc)
        if m in self._sessions:
            self._sessions.pop(m).close()
        log.warning("mirror %s failed: %s", self.mirrors[m].label, reason)
        return reason

    def next_attempt(self) -> None:
        self._broken.clear()

    def all_lied(self) -> bool:
        return len(self._lied) == len(self.mirrors)

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()


def _with_failover(
    mirrors: list[Mirror],
    tasks: list[_Task],
    stats: FetchStats,
    timeout_s: float,
    passes: int = PASSES,
) -> None:
    """Run every task, trying its mirrors in its order, `passes` times, until one succeeds."""
    pool = _Pool(mirrors, stats, timeout_s)
    pending = tasks
    attempts = passes * len(mirrors)
    try:
        for attempt in range(attempts):
            if pool.all_lied():
                break
            if attempt and attempt % len(mirrors) == 0:
                time.sleep(backoff_delay(attempt // len(mirrors)))
            pool.next_attempt()
            failed = []
            for task in pending:
                m = task.order[attempt % len(mirrors)]
                reason = pool.run(task, m)
                if reason is not None:
                    task.errors.append(f"{mirrors[m].label}: {reason}")
                    failed.append(task)
            if not failed:
                return
            if attempt + 1 < attempts and not pool.all_lied():
                stats.failovers += len(failed)
            pending = failed
    finally:
        pool.close()
    first = pending[0]
    raise DataUnreachable(
        f"{len(pending)} of {len(tasks)} reads failed on every mirror "
        f"({', '.join(m.label for m in mirrors)}); first: {first.what}: {'; '.join(first.errors)}"
    )


def _mirrors(urls: list[str]) -> list[Mirror]:
    if not urls:
        raise UserError("no FTP mirrors configured: set data.mirrors or use embedded mirrors")
    return [Mirror.parse(u) for u in urls]


def fetch_file(
    mirrors: list[str],
    first: int,
    path: str,
    stats: FetchStats,
    timeout_s: float = 20.0,
    passes: int = PASSES,
    expected_sha256: str = "",
    max_bytes: int | None = None,
    expected_as: str = "the run was planned with",
) -> bytes:
    """A whole file (the manifest, a published model: at most `max_bytes`, by default the
    manifest's cap) from the first mirror that serves all of it; given its sha256, the first
    that serves that very file (`expected_as` says whose)."""
    started = time.monotonic()
    result: list[bytes] = []

    def run(session: _Session) -> None:
        data = session.read_file(path, MAX_MANIFEST_BYTES if max_bytes is None else max_bytes)
        served = sha256(data).hexdigest() if expected_sha256 else ""
        if served != expected_sha256:
            raise MirrorLied(
                f"serves a different {path} than {expected_as} ({len(data)} bytes, "
                f"sha256 {served[:12]}..., expected {expected_sha256[:12]}...)"
            )
        result.append(data)

    try:
        parsed = _mirrors(mirrors)
        task = _Task(path, _order(first, len(parsed), 0), run)
        _with_failover(parsed, [task], stats, timeout_s, passes)
    finally:
        stats.seconds += time.monotonic() - started
    return result[0]


def probe_file(url: str, path: str, timeout_s: float) -> bytes:
    """One attempt at a whole file (the manifest) on one mirror, for the plan-time check.

    A lie (MirrorLied) or a refused login (LoginRefused) is raised as such, since no wait cures
    it; any other fault is DataUnreachable, since the mirror may be back when the nodes run.
    """
    mirror = Mirror.parse(url)
    try:
        session = _Session(mirror, FetchStats(), timeout_s)
        try:
            return session.read_file(path, MAX_MANIFEST_BYTES)
        finally:
            session.close()
    except (MirrorLied, LoginRefused):
        raise
    except (_BadData, *all_errors) as exc:
        raise DataUnreachable(_reason(exc)) from None


def _runs(frags: list[Fragment]) -> list[list[Fragment]]:
    """Distinct fragments in byte-contiguous (or overlapping) runs of at most MAX_SPAN, each
    within one shard, sorted by offset; a shard's runs are neighbours, in shard order."""
    by_shard: dict[str, list[Fragment]] = {}
    for frag in {f.id: f for f in frags}.values():
        by_shard.setdefault(frag.shard, []).append(frag)
    runs: list[list[Fragment]] = []
    for shard_frags in by_shard.values():
        shard_frags.sort(key=_PLACE)
        run: list[Fragment] = []
        start = end = 0
        for frag in shard_frags:
            offset, stop = frag.offset, frag.offset + frag.length
            if run and offset <= end and max(end, stop) - start <= MAX_SPAN:
                run.append(frag)
                end = max(end, stop)
            else:
                run, start, end = [frag], offset, stop
                runs.append(run)
    return runs


def _end(frags: list[Fragment]) -> int:
    return max(f.offset + f.length for f in frags)


def _coalesce(frags: list[Fragment]) -> dict[str, list[list[Fragment]]]:
    """Per shard, fragments grouped into single-range reads.

    Byte-contiguous fragments share a read up to MAX_SPAN. Gaps are then read through, smallest
    first, each at most MAX_GAP and a read at most MAX_SPAN, for as long as the bytes read
    through stay within MAX_WASTE of the bytes needed: the node never downloads more than
    1 + MAX_WASTE times what it needs, and spends that allowance where it saves the most reads.
    """
    runs = _runs(frags)
    ends = [_end(run) for run in runs]
    budget = MAX_WASTE * sum(end - run[0].offset for run, end in zip(runs, ends, strict=True))
    gaps = sorted(
        (runs[i + 1][0].offset - ends[i], i)
        for i in range(len(runs) - 1)
        if runs[i + 1][0].shard == runs[i][0].shard
    )
    first = list(range(len(runs)))  # of a read's last run: the read's first run
    last = list(range(len(runs)))  # of a read's first run: the read's last run
    for gap, i in gaps:
        if gap > MAX_GAP or gap > budget:
            break
        head, tail = first[i], last[i + 1]
        if ends[tail] - runs[head][0].offset > MAX_SPAN:
            continue
        budget -= gap
        last[head], first[tail] = tail, head
    groups: dict[str, list[list[Fragment]]] = {}
    head = 0
    while head < len(runs):
        read = [frag for k in range(head, last[head] + 1) for frag in runs[k]]
        groups.setdefault(read[0].shard, []).append(read)
        head = last[head] + 1
    return groups


def _batches(frags: list[Fragment], max_ranges: int) -> dict[str, list[list[list[Fragment]]]]:
    """Per shard, multi-range reads: each a list of byte-contiguous runs, one range each, of at
    most max_ranges ranges and MAX_SPAN bytes in all. No gap is read through."""
    batches: dict[str, list[list[list[Fragment]]]] = {}
    size = 0
    for run in _runs(frags):
        length = _end(run) - run[0].offset
        reads = batches.setdefault(run[0].shard, [])
        if reads and len(reads[-1]) < max_ranges and size + length <= MAX_SPAN:
            reads[-1].append(run)
            size += length
        else:
            reads.append([run])
            size = length
    return batches


class _Verifier:
    """Checks a read's fragments against their hashes as their bytes arrive: hashing overlaps
    the transfer, which the socket's buffer carries on meanwhile. After a mismatch the read
    goes on to its end, unchecked, so that the session stays in step with the mirror."""

    def __init__(self, ranges: list[list[Fragment]]) -> None:
        self.spans = [(frags[0].offset, _end(frags) - frags[0].offset) for frags in ranges]
        frags, starts, ends = [], [], []  # where each fragment's bytes are in the read
        at = 0
        for run, (offset, length) in zip(ranges, self.spans, strict=True):
            for frag in run:
                frags.append(frag)
                starts.append(at + frag.offset - offset)
                ends.append(starts[-1] + frag.length)
            at += length
        # Flat lists in the order the fragments' bytes complete, not a tuple per fragment: a
        # read's objects live through garbage collections, and every one makes a full one nearer.
        order = sorted(range(len(frags)), key=ends.__getitem__)
        self._frags = [frags[k] for k in order]
        self._starts = [starts[k] for k in order]
        self._ends = [ends[k] for k in order]
        self._next = 0
        self.blobs: dict[int, memoryview] = {}
        self.wrong = ""

    def __call__(self, data: memoryview, arrived: int) -> None:
        k, ends = self._next, self._ends
        while k < len(ends) and ends[k] <= arrived and not self.wrong:
            frag, blob = self._frags[k], data[self._starts[k] : ends[k]]
            if frag.matches(blob):
                self.blobs[frag.id] = blob  # a read-only view of the read's own buffer
            else:
                self.wrong = f"{frag.hash_name} mismatch for fragment {frag.id}"
            k += 1
        self._next = k


def _read_verified(
    session: _Session, ranges: list[list[Fragment]], out: dict[int, memoryview]
) -> None:
    """One read of a shard's ranges, each spanning its fragments (sorted by offset, gaps read
    through); every fragment is checked against its hash before any of them is kept."""
    verifier = _Verifier(ranges)
    session.read(ranges[0][0].shard, verifier.spans, verifier)
    if verifier.wrong:
        raise _BadData(verifier.wrong)
    out.update(verifier.blobs)


def _shard_task(
    ranges: list[list[Fragment]], order: list[int], out: dict[int, memoryview]
) -> _Task:
    """A multi-range read's worth of a shard's fragments (byte-contiguous runs) from one mirror:
    in that one read from a mirror that takes as many ranges per RETR, in reads of as many as it
    takes from one that takes fewer, else as coalesced single-range reads. After a fault only
    the fragments still missing are read again, from the next mirror, whatever it takes."""
    frags = [frag for run in ranges for frag in run]

    def run(session: _Session) -> None:
        missing = [f for f in frags if f.id not in out]
        if len(missing) == len(frags) and len(ranges) <= session.max_ranges:
            reads = [ranges]
        elif session.max_ranges > 1:
            reads = [
                rs for batches in _batches(missing, session.max_ranges).values() for rs in batches
            ]
        else:
            reads = [[group] for groups in _coalesce(missing).values() for group in groups]
        for read in reads:
            _read_verified(session, read, out)

    shard, start = ranges[0][0].shard, ranges[0][0].offset
    return _Task(f"{shard} bytes {start}-{_end(ranges[-1])}", order, run)


def fetch_fragments(
    mirrors: list[str],
    first: int,
    frags: list[Fragment],
    stats: FetchStats,
    timeout_s: float = 20.0,
) -> dict[int, memoryview]:
    """Verified bytes of each fragment, by fragment id: read-only views of the buffers they
    were received in, never copied.

    Shards start on different mirrors (first, first+1, ...) so that one node spreads its load;
    a caller fetching in parallel lanes gives each lane its own `first`.
    """
    started = time.monotonic()
    out: dict[int, memoryview] = {}
    try:
        parsed = _mirrors(mirrors)
        reads = [
            (rank, ranges)
            for rank, batches in enumerate(_batches(frags, MAX_RANGES).values())
            for ranges in batches
        ]
        tasks = [
            _shard_task(ranges, _order(first + rank, len(parsed), salt), out)
            for salt, (rank, ranges) in enumerate(reads)
        ]
        if tasks:
            _with_failover(parsed, tasks, stats, timeout_s)
    finally:
        stats.seconds += time.monotonic() - started
    return out
