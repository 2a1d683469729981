"""The links transfers share: the submit host's (HTCondor file transfer) and the mirrors'."""

_MB = 1e6


class Link:
    """A shared link (the submit host's, the mirrors'): transfers queue for it in turn, and one
    transfer goes no faster than the execute machine's own link."""

    def __init__(self, mb_s: float, machine_mb_s: float) -> None:
        self.rate, self.machine_rate, self.free_at = mb_s * _MB, machine_mb_s * _MB, 0.0

    def send(self, now: float, size: int) -> float:
        """When `size` bytes starting now have arrived."""
        if size <= 0:
            return now
        self.free_at = max(now, self.free_at) + size / self.rate
        return max(self.free_at, now + size / self.machine_rate)
