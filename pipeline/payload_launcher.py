"""A node job's dagtrain.pyz when the mirrors serve the run's models: the job payload's launcher.

The job payload (node_payload and aggregation, 130 KB) is the same for every job of a run, and
for every run of the same sources. So when the mirrors serve a run's models, the planner
publishes the payload beside them, and node jobs get by file transfer only this launcher: a zip
of this file as its __main__.py, launcher.json (the payload's sha256, size, path on the mirrors
and the places of the mirrors that hold it) and the payload's own node_payload/machine_cache.py
(where the machine's cache is). It runs the payload from the machine's cache,
payloads/SHA256.pyz, when that file's sha256 is the payload's. Otherwise (no such file, or other
bytes: one line says so and the file goes) it reads the payload from the mirrors that hold it,
each in turn from the node's own, believing none beyond the size and the sha256, keeps it in the
cache, and runs it. It runs in this process, as `python dagtrain.pyz` would run the payload (so
a warm interpreter of the local runner stays warm), and tells it how it came through
LAUNCHED_VARIABLE (node_payload/common/job_bytes.py counts the bytes).

Standard library only, and nothing of dagtrain but machine_cache.py: it runs before the payload
is on the machine. The mirrors and the cache's place come from the job's config.toml.
"""

import ftplib
import hashlib
import json
import os
import sys
import time
import tomllib
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

SPEC = "launcher.json"
PAYLOADS = "payloads"
EXIT_RETRYABLE = 75  # node_payload/common/errors.py: DAGMan retries the node
EXIT_FATAL = 78
LAUNCHED_VARIABLE = "DAGTRAIN_LAUNCHED"  # node_payload/common/job_bytes.py
TIMEOUT_S = 20.0
PASSES = 2
PASS_WAIT_S = 5.0


class _TooLarge(Exception):
    """The mirror sends more than the payload's size."""


def _label(url: str) -> str:
    parts = urlsplit(url)
    return f"ftp://{parts.hostname}:{parts.port or 21}/{parts.path.strip('/')}"


def _read(url: str, path: str, size: int) -> bytes:
    """The file at `path` below the mirror URL's root, at most `size` bytes."""
    parts = urlsplit(url)
    timeout = float(parse_qs(parts.query).get("timeout", [TIMEOUT_S])[-1])
    chunks: list[bytes] = []

    def keep(chunk: bytes) -> None:
        chunks.append(chunk)
        if sum(map(len, chunks)) > size:
            raise _TooLarge(f"serves more than the payload's {size} bytes")

    ftp = ftplib.FTP(timeout=timeout)
    try:
        ftp.connect(parts.hostname or "", parts.port or 21)
        ftp.login(unquote(parts.username or "") or "anonymous", unquote(parts.password or ""))
        ftp.voidcmd("TYPE I")
        root = unquote(parts.path.strip("/"))
        ftp.retrbinary(f"RETR {root}/{path}" if root else f"RETR {path}", keep)
    finally:
        ftp.close()
    return b"".join(chunks)


def _fetch(spec: dict, mirrors: list[str], first: int) -> bytes | None:
    """The payload from the first mirror that serves its very bytes, or None."""
    for attempt in range(PASSES):
        if attempt:
            time.sleep(PASS_WAIT_S)
        for turn in range(len(mirrors)):
            url = mirrors[(first + turn) % len(mirrors)]
            try:
                data = _read(url, spec["path"], spec["bytes"])
            except (OSError, EOFError, _TooLarge, *ftplib.all_errors) as exc:
                why = str(exc) or type(exc).__name__
                print(f"payload: {_label(url)}: {why}", file=sys.stderr)
                continue
            digest = hashlib.sha256(data).hexdigest()
            if digest == spec["sha256"]:
                return data
            print(
                f"payload: {_label(url)} serves {len(data)} bytes of sha256 {digest[:12]}..., not "
                f"the run's {spec['sha256'][:12]}...; asking the next mirror",
                file=sys.stderr,
            )
    return None


def _cached(path: Path | None, sha256: str) -> bool:
    """Whether the cache holds the payload; a file of other bytes is named and removed."""
    if path is None or not path.is_file():
        return False
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest == sha256:
        return True
    print(
        f"payload: the cached {path} has sha256 {digest[:12]}..., not the run's "
        f"{sha256[:12]}...; fetched again",
        file=sys.stderr,
    )
    path.unlink(missing_ok=True)
    return False


def _keep(folder: Path | None, name: str, data: bytes) -> Path:
    """The fetched payload written into the cache, or into the job's own folder without one."""
    if folder is not None:
        target = folder / name
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
            return target
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            print(f"payload: cannot keep it in {folder} ({exc}); this job only", file=sys.stderr)
    target = Path.cwd() / f".{name}"
    target.write_bytes(data)
    return target


def _option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv[:-1] else None


def main(argv: list[str]) -> int:
    import machine_cache  # the payload's node_payload/machine_cache.py, packed beside this file

    archive = Path(__loader__.archive)  # type: ignore[attr-defined]  # this launcher's zip
    spec = json.loads(__loader__.get_data(str(archive / SPEC)))  # type: ignore[attr-defined]
    config_path = _option(argv, "--config")
    if config_path is None:
        print("dagtrain.pyz (the payload's launcher) runs node jobs: no --config", file=sys.stderr)
        return EXIT_FATAL
    with open(config_path, "rb") as f:
        data = tomllib.load(f)["data"]
    mirrors = [data["mirrors"][place] for place in spec["mirrors"]]
    folder = machine_cache.private_folder(
        data["node_cache"], PAYLOADS, "the payload is fetched for this job only"
    )
    name = f"{spec['sha256']}.pyz"
    fetched = 0
    if _cached(folder / name if folder else None, spec["sha256"]):
        path = folder / name  # type: ignore[operator]
        machine_cache.used(path)
    else:
        node = _option(argv, "--node")
        payload = _fetch(spec, mirrors, int(node) if node and node.isdigit() else 0)
        if payload is None:
            print(f"payload: no mirror served {spec['path']}; DAGMan retries", file=sys.stderr)
            return EXIT_RETRYABLE
        path, fetched = _keep(folder, name, payload), len(payload)
    cached = 0 if fetched else spec["bytes"]
    os.environ[LAUNCHED_VARIABLE] = f"{archive.stat().st_size} {fetched} {cached}"
    sys.path.insert(0, str(path))
    sys.argv[0] = str(path)
    from aggregation.job_commands import main as run_payload

    return run_payload(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
