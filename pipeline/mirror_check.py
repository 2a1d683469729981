"""Plan-time check that the mirrors serve the dataset the run is planned with.

A mirror that cannot be reached now may be back when the nodes run (they fail over), so it only
gets a warning, as does one refusing the login (nodes skip it too; the message names the user to
fix). A mirror that serves another manifest, or lies about its size, would make every node that
starts there fail over or, worse, train on another dataset: planning refuses it, naming it.
"""

import hashlib
from concurrent.futures import ThreadPoolExecutor

from rich.console import Console
from rich.markup import escape

from node_payload.common.errors import UserError
from node_payload.common.mirror_url import Mirror
from node_payload.fetch import DataUnreachable, LoginRefused, MirrorLied, probe_file

MANIFEST = "manifest.json"
TIMEOUT_S = 10.0


def _served_digest(url: str, timeout_s: float) -> str | Exception:
    """The sha256 of the mirror's manifest, or why it could not be read (one attempt)."""
    try:
        data = probe_file(url, MANIFEST, timeout_s)
    except (DataUnreachable, LoginRefused, MirrorLied) as exc:
        return exc
    return hashlib.sha256(data).hexdigest()


def _warn(console: Console, label: str, answer: Exception) -> None:
    """One line: a refused login names its user (LoginRefused says so), others are outages."""
    what = f": {answer}" if isinstance(answer, LoginRefused) else f" is unreachable now: {answer}"
    console.print(
        f"[yellow]warning:[/] mirror {escape(label)}{escape(what)} (nodes will skip it)",
        soft_wrap=True,
    )


def check_mirrors(mirrors: list[str], manifest_sha256: str, timeout_s: float = TIMEOUT_S) -> None:
    """Every reachable mirror must hold the planned manifest; at least one must be reachable.

    Mirrors are asked in parallel, so a silent one costs one timeout in total.
    """
    labels = [Mirror.parse(url).label for url in mirrors]
    with ThreadPoolExecutor(min(len(mirrors), 8)) as pool:
        answers = list(pool.map(lambda url: _served_digest(url, timeout_s), mirrors))
    console = Console(stderr=True)
    different, lying = [], []
    for label, answer in zip(labels, answers, strict=True):
        if isinstance(answer, MirrorLied):
            lying.append(f"{label}: {answer}")
        elif isinstance(answer, Exception):
            _warn(console, label, answer)
        elif answer != manifest_sha256:
            different.append(label)
    if lying:
        raise UserError(
            f"[data] mirrors: {'; '.join(lying)}; upload this dataset to "
            f"{'it' if len(lying) == 1 else 'them'} with `dagtrain upload DATASET URL "
            "--replace`, or remove it from the list"
        )
    if different:
        raise UserError(
            f"[data] mirrors: {', '.join(different)} serve{'s' if len(different) == 1 else ''} a "
            f"different {MANIFEST} than the dataset being planned; upload this dataset to "
            f"{'it' if len(different) == 1 else 'them'} with `dagtrain upload DATASET URL "
            "--replace`, or remove it from the list"
        )
    if all(isinstance(answer, Exception) for answer in answers):
        raise UserError(
            "[data] mirrors: none of the mirrors is reachable; check the URLs, or leave "
            "mirrors empty to use the embedded mirrors"
        )
