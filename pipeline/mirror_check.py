"""Plan-time check that the mirrors serve the dataset the run is planned with."""

import hashlib

from rich.console import Console

from node_payload.errors import UserError
from node_payload.fetch import DataUnreachable, FetchStats, fetch_file


def check_mirrors(mirrors: list[str], manifest_sha256: str) -> None:
    """Every reachable mirror must hold the planned manifest; at least one must be reachable."""
    reachable = 0
    for index, url in enumerate(mirrors):
        try:
            data = fetch_file([url], 0, "manifest.json", FetchStats(), timeout_s=10.0)
        except DataUnreachable as exc:
            Console(stderr=True).print(f"[yellow]warning:[/] mirror {index} unreachable: {exc}")
            continue
        if hashlib.sha256(data).hexdigest() != manifest_sha256:
            raise UserError(
                f"[data] mirrors: mirror {index} serves a different manifest.json than the "
                "dataset being planned; upload the prepared dataset to it again or remove it"
            )
        reachable += 1
    if not reachable:
        raise UserError(
            "[data] mirrors: none of the mirrors is reachable; check the URLs, or leave "
            "mirrors empty to use the embedded mirrors"
        )
