"""A new global model leaves the submit host once, to the mirrors; node jobs get its pointer.

Runs wherever a model is made: the planner (version 0), a synchronous round's aggregation and an
asynchronous version's step. When the run's models come from the mirrors
(`RunConfig.models_from_mirrors`), the model is published and then its pointer
(`models/global_rNNN.json`, node_payload/common/model_pointer.py) is written beside it,
atomically: a pointer exists only for a model the mirrors serve, so a node job given one can
fetch it. Embedded mirrors serve the run's models/ folder directly, so there, publishing is the
model's atomic write. `[data] publish` names an upload URL for each of the first mirrors (each URL
writes where its mirror serves from): the model goes to a hidden name on each, is checked by size
and renamed into place (a node's sha256 check catches any other fault). The pointer lists the
mirrors that hold the model, so a mirror whose upload failed is named once here and never asked
by the nodes; only when none took the model does the step fail.

From version 1 on, the model's delta from the version before (node_payload/common/model_delta.py)
is published beside it when it is smaller than the model, and the pointer names it: a node
whose cache holds the version before fetches only the delta. The planner publishes the job
payload the same way (`publish_payload`), so node jobs get only its launcher.

Upload passwords are never in config.toml (every node job gets it): they come from ~/.netrc on
the machine that publishes, as ftplib's own clients do.
"""

import netrc
from dataclasses import replace
from ftplib import all_errors
from pathlib import Path, PurePosixPath

from aggregation.ftp_transport import FtpTransport, failure_reason, part_name
from node_payload.common.atomic_file import write_text
from node_payload.common.errors import UserError
from node_payload.common.mirror_url import Mirror
from node_payload.common.model_delta import BadDelta, DeltaIdentity, write_delta
from node_payload.common.model_pointer import DeltaPointer, file_sha256, pointer_to
from node_payload.common.run_config import RunConfig
from node_payload.common.run_layout import (
    model_delta_path,
    model_path,
    model_pointer_path,
    published_delta_path,
    published_model_path,
    published_payload_path,
)


def publish_model(run_dir: Path, config: RunConfig, version: int) -> int:
    """Publish a version's model (and its delta) and write its pointer; returns the bytes
    uploaded."""
    if not config.models_from_mirrors:
        return 0
    model = model_path(run_dir, version)
    delta = _delta(run_dir, config.run.run_id, version)
    files = [(model, published_model_path(config.run.run_id, version))]
    if delta:
        files.append((model_delta_path(run_dir, version), delta.path))
    sent, holding = publish_files(config, files)
    pointer = pointer_to(model, config.run.run_id, version, holding, delta)
    write_text(model_pointer_path(run_dir, version), pointer.to_json())
    return sent


def publish_payload(config: RunConfig, payload: Path) -> list[int]:
    """Publish the job payload beside the run's models; the places of the mirrors that hold it."""
    return publish_files(config, [(payload, published_payload_path(config.run.run_id))])[1]


def publish_files(config: RunConfig, files: list[tuple[Path, str]]) -> tuple[int, list[int]]:
    """Upload each (local file, path on the mirrors) to `[data] publish`, or nothing to the
    embedded mirrors, which serve them from the run directory; the bytes sent and the places
    of the mirrors that hold them all."""
    if config.data.publish:
        return upload_files(list(config.data.publish), files)
    return 0, list(range(len(config.data.mirrors)))


def _delta(run_dir: Path, run_id: str, version: int) -> DeltaPointer | None:
    """Write the delta from the version before to `version` beside the model; its pointer, or
    None (no delta file) for version 0 or when the delta is not smaller than the model."""
    target, model, base = (
        model_delta_path(run_dir, version),
        model_path(run_dir, version),
        model_path(run_dir, version - 1),
    )
    target.unlink(missing_ok=True)  # a rerun's or an older plan's: never published stale
    if version == 0 or not base.is_file():
        return None
    base_sha256, sha256 = file_sha256(base), file_sha256(model)
    identity = DeltaIdentity(run_id, version - 1, version, base_sha256, sha256)
    try:
        size = write_delta(base, model, target, identity)
    except BadDelta as exc:
        print(f"version {version}: no delta from version {version - 1} ({exc})", flush=True)
        return None
    if size >= model.stat().st_size:
        target.unlink()
        print(
            f"version {version}: its delta would be {size} bytes, the model {model.stat().st_size}"
            ": nodes fetch the model whole",
            flush=True,
        )
        return None
    path = published_delta_path(run_id, version)
    return DeltaPointer(path, size, file_sha256(target), version - 1, base_sha256)


def upload_files(urls: list[str], files: list[tuple[Path, str]]) -> tuple[int, list[int]]:
    """Each (local file, path) to that path below each URL: the bytes sent, and the places of
    the URLs that hold them all now. Raises UserError when none took them."""
    failures: dict[str, str] = {}
    sent, holding = 0, []
    names = ", ".join(path for _, path in files)
    for place, url in enumerate(urls):
        mirror = with_password(Mirror.parse(url))
        try:
            sent += sum(_upload_one(mirror, local, path) for local, path in files)
            holding.append(place)
        except (OSError, EOFError, *all_errors) as exc:
            failures[mirror.label] = failure_reason(exc)
    for label, why in failures.items():
        print(f"publishing {names} on {label} failed: {why}; nodes use the others", flush=True)
    if not holding:
        raise UserError(
            f"no mirror in [data] publish took {names} ({'; '.join(failures.values())}); check "
            "that the URLs are reachable and writable, then plan, or run the DAG, again"
        )
    return sent, holding


def _upload_one(mirror: Mirror, model: Path, path: str) -> int:
    transport = FtpTransport(mirror)
    try:
        transport.makedirs(str(PurePosixPath(path).parent))
        part = part_name(path)
        transport.put(model, part, 0, lambda _chunk: None)
        size, sent = transport.size(part), model.stat().st_size
        if size != sent:
            raise OSError(f"the mirror holds {size} bytes of the {sent} sent")
        transport.rename(part, path)
        return sent
    finally:
        transport.close()


def with_password(mirror: Mirror) -> Mirror:
    """A publish URL with a user gets that user's password from ~/.netrc (`machine HOST login
    USER password ...`); without a user, the login is anonymous."""
    if not mirror.user:
        return mirror
    where = f"[data] publish {mirror.label}"
    try:
        entry = netrc.netrc().authenticators(mirror.host)
    except (OSError, netrc.NetrcParseError) as exc:
        raise UserError(
            f"{where}: cannot read ~/.netrc for its password ({exc}); add the line "
            f"'machine {mirror.host} login {mirror.user} password ...' to ~/.netrc (mode 0600)"
        ) from None
    if entry is None or entry[0] != mirror.user:
        raise UserError(
            f"{where}: ~/.netrc has no password for {mirror.user} on {mirror.host}; add the "
            f"line 'machine {mirror.host} login {mirror.user} password ...' to it"
        )
    return replace(mirror, password=entry[2] or "")
