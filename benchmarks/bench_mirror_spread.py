"""How evenly a round's nodes spread their reads over the mirrors, measured by the mirrors.

Each of the mirrors (pyftpdlib on loopback) counts the bytes its data connections send; 8 nodes
then fetch their manifest and local sets exactly as node jobs do (first mirror = node + attempt).
Prints bytes per mirror and busiest / least busy (target: at most 1.2), both by the bytes the
nodes read and by the bytes the mirrors put on the wire. The mirrors are the embedded ones, which
send a shard's ranges of a read in one transfer (MRNG) and stop at the range end the node
announces; `--plain` makes them plain pyftpdlib servers, read one range per RETR, which stream
past the end of a range until the node closes the data connection. `--connections N` fetches
over N connections (lanes) per node instead of local_data.CONNECTIONS.

Run:  python benchmarks/bench_mirror_spread.py [NODES] [MIRRORS] [LOCAL_TRAIN] [--plain]
          [--connections N]
"""

import argparse
import fcntl
import socket
import struct
import tempfile
import threading
from pathlib import Path

from pyftpdlib.handlers import FTPHandler

from node_payload import local_data
from node_payload.fetch import FetchStats
from node_payload.local_data import BlockSource, fetch_blocks, planned_manifest
from node_payload.sampling import local_sets
from pipeline.dataset_prepare import prepare
from pipeline.mirrors import MirrorServer, MultiRangeFTPHandler, read_only_handler
from pipeline.textures import generate

TCPI_BYTES_SENT = 200  # offset of tcpi_bytes_sent in Linux's struct tcp_info (4.19+)
TCP_OPEN = (1, 8)  # tcpi_state ESTABLISHED, CLOSE_WAIT: the peer did not reset the connection
SIOCOUTQNSD = 0x894B  # ioctl: bytes in the send queue not yet sent


def counting_handler(
    root: Path, sent: list[int], index: int, base: type[FTPHandler] = MultiRangeFTPHandler
) -> type[FTPHandler]:
    """A read-only handler whose data connections add what they sent to sent[index].

    Counted as the bytes the connection put on the wire (Linux TCP_INFO) plus, while it is still
    open, the bytes queued but not yet sent (SIOCOUTQNSD), which go out after the close: a RETR
    the node closed early leaves data in the server's socket buffer that is never sent.
    """
    lock = threading.Lock()

    class CountingDTP(base.dtp_handler):
        def close(self) -> None:
            if not self._closed:
                info = self.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
                n = struct.unpack_from("Q", info, TCPI_BYTES_SENT)[0]
                if info[0] in TCP_OPEN:
                    queued = fcntl.ioctl(self.socket.fileno(), SIOCOUTQNSD, bytes(4))
                    n += struct.unpack("i", queued)[0]
                with lock:
                    sent[index] += n
            super().close()

    return read_only_handler(root, type("Counting", (base,), {"dtp_handler": CountingDTP}))


def spread(
    dataset: Path, nodes: int, k: int, n_train: int, seed: int = 0, plain: bool = False
) -> tuple[list[int], list[int]]:
    """Bytes each of k mirrors sent while `nodes` node fetches ran (attempt 0, one round), and
    the bytes the nodes kept from each (their reads, without what came after a read's end)."""
    sent = [0] * k
    kept = [0] * k
    base = FTPHandler if plain else MultiRangeFTPHandler
    servers = [MirrorServer(counting_handler(dataset, sent, i, base)) for i in range(k)]
    try:
        urls = [s.url for s in servers]
        digest = None
        for node in range(nodes):
            stats = FetchStats()
            first = node % k  # node_job: (node + attempt) % len(mirrors)
            manifest = planned_manifest(urls, first, digest or "", stats)
            digest = manifest.digest()
            train, test = local_sets(manifest, seed * 1000 + node, n_train, n_train // 4)
            fetch_blocks(manifest, train, BlockSource(urls, first, stats))
            fetch_blocks(manifest, test, BlockSource(urls, first, stats))
            for i, url in enumerate(urls):
                kept[i] += stats.per_mirror_bytes.get(url, 0)
    finally:
        for server in servers:
            server.close()
    return sent, kept


def _mb(counts: list[int]) -> str:
    return ", ".join(f"{b / 1e6:.2f}" for b in counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("nodes", nargs="?", type=int, default=8)
    parser.add_argument("k", nargs="?", type=int, default=3, metavar="MIRRORS")
    parser.add_argument("n_train", nargs="?", type=int, default=384, metavar="LOCAL_TRAIN")
    parser.add_argument("--plain", action="store_true", help="plain pyftpdlib mirrors")
    parser.add_argument(
        "--connections",
        type=int,
        default=local_data.CONNECTIONS,
        help=f"connections per node (default {local_data.CONNECTIONS})",
    )
    args = parser.parse_args()
    nodes, k, n_train, plain = args.nodes, args.k, args.n_train, args.plain
    local_data.CONNECTIONS = args.connections
    with tempfile.TemporaryDirectory() as tmp:
        src = generate(
            Path(tmp) / "src", classes=3, images_per_class=4, size=1024, height=768, progress=False
        )
        out = Path(tmp) / "out"
        prepare(
            src,
            out,
            tile=128,
            overlap=0.5,
            holdout=0.25,
            angles="0:360:30",
            workers=1,
            progress=False,
        )
        wire, reads, sent_total, kept_total = [], [], 0, 0
        for seed in range(3):
            sent, kept = spread(out, nodes, k, n_train, seed, plain)
            wire.append(max(sent) / min(sent))
            reads.append(max(kept) / min(kept))
            sent_total, kept_total = sent_total + sum(sent), kept_total + sum(kept)
            print(
                f"seed {seed}: MB on the wire per mirror [{_mb(sent)}], busiest / least busy "
                f"{wire[-1]:.3f}; MB of the nodes' reads [{_mb(kept)}], {reads[-1]:.3f}"
            )
        print(
            f"{nodes} nodes x {k} mirrors, {args.connections} connections a node, busiest / "
            "least busy (worst of 3): "
            f"{max(reads):.3f} by the bytes read, {max(wire):.3f} by the bytes on the wire "
            f"(wire / read {sent_total / kept_total:.2f})"
        )


if __name__ == "__main__":
    main()
