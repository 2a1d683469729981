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
from node_payload.common.model_pointer import pointer_to
from node_payload.common.run_config import RunConfig
from node_payload.common.run_layout import model_path, model_pointer_path, published_model_path


def publish_model(run_dir: Path, config: RunConfig, version: int) -> int:
    """Publish a version's model and write its pointer; returns the bytes uploaded."""
    if not config.models_from_mirrors:
        return 0
    model = model_path(run_dir, version)
    path = published_model_path(config.run.run_id, version)
    if config.data.publish:
        sent, holding = upload_model(list(config.data.publish), model, path)
    else:  # the embedded mirrors serve models/ itself
        sent, holding = 0, list(range(len(config.data.mirrors)))
    pointer = pointer_to(model, config.run.run_id, version, holding)
    write_text(model_pointer_path(run_dir, version), pointer.to_json())
    return sent


def upload_model(urls: list[str], model: Path, path: str) -> tuple[int, list[int]]:
    """The model to `path` below each URL: the bytes sent, and the places of the URLs that hold
    it now. Raises UserError when none took it."""
    failures: dict[str, str] = {}
    sent, holding = 0, []
    for place, url in enumerate(urls):
        mirror = with_password(Mirror.parse(url))
        try:
            sent += _upload_one(mirror, model, path)
            holding.append(place)
        except (OSError, EOFError, *all_errors) as exc:
            failures[mirror.label] = failure_reason(exc)
    for label, why in failures.items():
        print(f"publishing {path} on {label} failed: {why}; nodes use the others", flush=True)
    if not holding:
        raise UserError(
            f"no mirror in [data] publish took {path} ({'; '.join(failures.values())}); check "
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
