"""Which fragments a node trains and tests on, and which ones form the held-out test.

Everything is a pure function of the manifest and a seed (numpy PCG64, never global state), so a
retried node job draws exactly the same local dataset and every run can be reproduced.

A node's local test must measure generalisation to unseen images, not to unseen crops of images
it trained on, so per class the non-holdout source images are split into train sources and test
sources. Held-out sources are reserved for the global held-out test and never reach a node.

Fragment ids of one source form a contiguous range (see node_payload.common.manifest), so draws work on
counts and offsets and never materialise the millions of (position, angle) fragments.

A node's local set must resemble what one machine training alone would draw batches from: many
source images per class, not a few of them cut into many crops. Each class's quota is spread over
min(TARGET_SOURCES, its training sources) source images (ChunkPolicy), and each of those gives one
*chunk*: a compact patch of neighbouring positions, each with one random angle. Neighbouring
positions share the blocks under their rotation contexts, so a patch needs few blocks; it lies
anywhere in its source, so every training position can be drawn and coverage still grows with
nodes x rounds. Bytes fetched stay within 1 + MAX_WASTE of the blocks under the drawn fragments
whatever the policy (node_payload.fetch reads through a gap only when that holds); what a policy
changes is how many blocks those are (benchmarks/bench_sampling.py measures both).
"""

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from node_payload.common.errors import UserError
from node_payload.common.manifest import Manifest

_FIX = "lower [data] local_train/local_test or add more source images"
# Source images a class's local set spans (when it has them and its quota allows). One machine
# draws every batch from all of a class's images. On the UIUC photographs (32 fragments a class,
# benchmarks/bench_sampling.py) 16 took held-out accuracy from 0.620 (one image a class) to
# 0.654, against 0.671 for fragments scattered over 25 images, for 2/3 of scattered's bytes.
TARGET_SOURCES = 16
_SHAPES = ("patch", "run", "scatter")


@dataclass(frozen=True)
class ChunkPolicy:
    """How a class's quota of positions is cut into chunks, one chunk per source image.

    The quota is spread over at most `sources` images of the class (0: no limit), but no chunk
    holds fewer than `min_chunk` positions unless the quota itself is smaller. `shape` is the
    chunk within its source: a compact "patch" of positions (fewest blocks), a "run" of
    consecutive positions in row order (bands of whole rows: one contiguous byte range), or
    "scatter", random positions (the reference for diversity within a source).
    """

    sources: int = TARGET_SOURCES
    min_chunk: int = 1
    shape: Literal["patch", "run", "scatter"] = "patch"

    def __post_init__(self) -> None:
        if self.sources < 0 or self.min_chunk < 1 or self.shape not in _SHAPES:
            raise ValueError(
                f"{self}: sources must be >= 0, min_chunk >= 1 and shape one of {_SHAPES}"
            )

    def spread(self, quota: int, available: int) -> int:
        """How many source images a quota of `quota` positions is spread over."""
        wanted = max(1, quota // self.min_chunk)
        if self.sources:
            wanted = min(wanted, self.sources)
        return max(1, min(wanted, available, quota))


ADAPTIVE = ChunkPolicy()


def node_seed(run_seed: int, round_: int, node: int) -> int:
    """The first 8 bytes (big-endian) of sha256("dagtrain-node/{run_seed}/{round_}/{node}"),
    masked to 63 bits: stable across Python/numpy versions and uncorrelated between nodes."""
    digest = hashlib.sha256(f"dagtrain-node/{run_seed}/{round_}/{node}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def _rng(seed: int) -> np.random.Generator:
    if seed < 0:
        raise UserError(f"seeds must be non-negative, got {seed}")
    return np.random.Generator(np.random.PCG64(seed))


def class_quotas(total: int, n_classes: int, rng: np.random.Generator) -> list[int]:
    """Spread `total` over the classes: each gets floor or ceil, random classes get the extra."""
    base, extra = divmod(total, n_classes)
    quotas = [base] * n_classes
    for c in rng.choice(n_classes, size=extra, replace=False):
        quotas[int(c)] += 1
    return quotas


def class_pools(manifest: Manifest, holdout: bool) -> list[dict[int, range]]:
    """Per class: source index -> fragment ids, for holdout or for non-holdout sources."""
    pools: list[dict[int, range]] = [{} for _ in manifest.classes]
    for source, ids in manifest.by_source().items():
        src = manifest.sources[source]
        if src.holdout == holdout:
            pools[src.label][source] = ids
    return pools


def _train_range(counts: list[int], n_train: int, n_test: int) -> tuple[int, int]:
    """Admissible fragment totals of the train sources: at least n_train, leaving at least n_test
    for the test sources, and at least one source on each side (every count is >= 1)."""
    total = sum(counts)
    return max(n_train, 1), min(total - n_test, total - 1)


def _subset_sums(counts: list[int], high: int) -> list[int]:
    """Bitsets of the subset sums (up to `high`) of each prefix of `counts`."""
    mask = (1 << (high + 1)) - 1
    reach = [1]
    for count in counts:
        reach.append((reach[-1] | (reach[-1] << count)) & mask)
    return reach


def _feasible(counts: list[int], low: int, high: int) -> bool:
    # Prefix sums rise in steps of at most max(counts), so a window at least that wide always
    # holds one; only near full capacity does the exact subset-sum question arise.
    if high < low:
        return False
    return high - low + 1 >= max(counts) or _subset_sums(counts, high)[-1] >> low != 0


def _check_class(manifest: Manifest, label: int, counts: list[int], n_train: int, n_test: int):
    name = manifest.classes[label]
    if len(counts) < 2:
        raise UserError(
            f"class {name!r} has {len(counts)} non-holdout source image(s) in {manifest.origin}; "
            "local sets need at least 2 (local test images must differ from local train images): "
            "add source images or lower [data] holdout"
        )
    if not _feasible(counts, *_train_range(counts, n_train, n_test)):
        raise UserError(
            f"class {name!r} cannot supply {n_train} local-train and {n_test} local-test "
            f"fragments from disjoint source images ({len(counts)} non-holdout sources with "
            f"{sum(counts)} fragments, largest {max(counts)}): {_FIX}"
        )


def check_capacity(manifest: Manifest, n_train: int, n_test: int) -> None:
    """UserError unless every class can supply its (rounded-up) share for every seed."""
    if n_train < 1 or n_test < 0:
        raise UserError(f"local set sizes must be local_train >= 1 and local_test >= 0: {_FIX}")
    per_train = math.ceil(n_train / len(manifest.classes))
    per_test = math.ceil(n_test / len(manifest.classes))
    for label, pool in enumerate(class_pools(manifest, holdout=False)):
        _check_class(manifest, label, [len(ids) for ids in pool.values()], per_train, per_test)


def _wanted_train_sources(n_sources: int, n_train: int, n_test: int) -> int:
    """Train sources a split aims for: its share of the sources by quota, and at least as many
    as the local train set aims to span while one source is left for the local test."""
    share = round(n_sources * n_train / max(n_train + n_test, 1))
    return max(share, min(TARGET_SOURCES, n_sources - 1))


def _split_sources(
    sources: list[int], counts: list[int], n_train: int, n_test: int, rng: np.random.Generator
) -> tuple[list[int], list[int]]:
    """A random admissible split of one class's sources into train and test sources: the cut of
    a random permutation nearest the wanted number of train sources, or an exact subset-sum
    split when no cut fits."""
    order = [int(i) for i in rng.permutation(len(sources))]
    counts = [counts[i] for i in order]
    low, high = _train_range(counts, n_train, n_test)
    prefix = np.cumsum(counts)[:-1]
    cuts = np.flatnonzero((prefix >= low) & (prefix <= high)) + 1
    if cuts.size:
        wanted = _wanted_train_sources(len(sources), n_train, n_test)
        k = int(cuts[np.argmin(np.abs(cuts - wanted))])
        return [sources[i] for i in order[:k]], [sources[i] for i in order[k:]]
    reach = _subset_sums(counts, high)
    target = low + (reach[-1] >> low & -(reach[-1] >> low)).bit_length() - 1
    train: list[int] = []
    test: list[int] = []
    for i in reversed(range(len(order))):
        if reach[i] >> target & 1:
            test.append(sources[order[i]])
        else:
            train.append(sources[order[i]])
            target -= counts[i]
    return train, test


def _draw(pool: dict[int, range], chosen: list[int], n: int, rng: np.random.Generator) -> list[int]:
    """n distinct ids, uniformly from the union of the chosen sources' id ranges."""
    ranges = [pool[source] for source in sorted(chosen)]
    ends = np.cumsum([len(r) for r in ranges])
    picks = rng.choice(int(ends[-1]) if len(ends) else 0, size=n, replace=False)
    which = np.searchsorted(ends, picks, side="right")
    starts = np.concatenate([[0], ends[:-1]])
    return [ranges[w][int(k - starts[w])] for w, k in zip(which, picks, strict=True)]


def _shares(caps: list[int], quota: int) -> list[int]:
    """The quota spread as evenly as the capacities allow (shares differ by at most one where
    no cap binds; earlier sources take the remainder)."""
    shares = [0] * len(caps)
    left = quota
    for j, i in enumerate(sorted(range(len(caps)), key=lambda i: caps[i])):
        shares[i] = min(caps[i], -(-left // (len(caps) - j)))
        left -= shares[i]
    return shares


def _chunk(nx: int, ny: int, n: int, shape: str, rng: np.random.Generator) -> list[int]:
    """n distinct position indices of an nx x ny source, as one chunk of the given shape."""
    if shape == "scatter":
        return sorted(int(p) for p in rng.choice(nx * ny, size=n, replace=False))
    if shape == "run":
        first = int(rng.integers(0, nx * ny - n + 1))
        return list(range(first, first + n))
    width = min(nx, max(math.isqrt(n - 1) + 1, -(-n // ny)))
    height = -(-n // width)
    x0 = int(rng.integers(0, nx - width + 1))
    y0 = int(rng.integers(0, ny - height + 1))
    return [(y0 + k // width) * nx + x0 + k % width for k in range(n)]


def _draw_chunks(
    manifest: Manifest,
    pool: dict[int, range],
    chosen: list[int],
    n: int,
    rng: np.random.Generator,
    policy: ChunkPolicy,
) -> list[int]:
    """n distinct ids as one chunk from each of policy.spread(...) random chosen sources, one
    random angle per position. Sources are added while the spread ones are too small; only
    when n exceeds every position of the chosen sources do positions repeat, with distinct
    angles."""
    if n == 0:
        return []
    n_angles = len(manifest.angles)
    order = [chosen[int(k)] for k in rng.permutation(len(chosen))]
    caps = [manifest.sources[s].nx * manifest.sources[s].ny for s in order]
    used = policy.spread(n, len(order))
    while used < len(order) and sum(caps[:used]) < n:
        used += 1
    positions: list[tuple[int, int]] = []  # (source, position index in the source)
    for source, share in zip(order[:used], _shares(caps[:used], n), strict=True):
        src = manifest.sources[source]
        positions += [(source, p) for p in _chunk(src.nx, src.ny, share, policy.shape, rng)]
    if len(positions) == n:
        angles = rng.integers(0, n_angles, size=n)
        return [pool[s][p * n_angles + int(a)] for (s, p), a in zip(positions, angles, strict=True)]
    per, extra = divmod(n, len(positions))
    more = set(rng.choice(len(positions), size=extra, replace=False).tolist())
    ids = []
    for i, (s, p) in enumerate(positions):
        for a in rng.choice(n_angles, size=per + (i in more), replace=False):
            ids.append(pool[s][p * n_angles + int(a)])
    return ids


def local_sets(
    manifest: Manifest, seed: int, n_train: int, n_test: int, policy: ChunkPolicy = ADAPTIVE
) -> tuple[list[int], list[int]]:
    """Class-balanced local train and test fragment ids (sorted) from disjoint source images,
    drawn as one chunk per source image over as many images as the policy spreads them."""
    check_capacity(manifest, n_train, n_test)
    rng = _rng(seed)
    train_quota = class_quotas(n_train, len(manifest.classes), rng)
    test_quota = class_quotas(n_test, len(manifest.classes), rng)
    train: list[int] = []
    test: list[int] = []
    for label, pool in enumerate(class_pools(manifest, holdout=False)):
        sources = sorted(pool)
        counts = [len(pool[s]) // len(manifest.angles) for s in sources]  # positions
        if not _feasible(counts, *_train_range(counts, train_quota[label], test_quota[label])):
            counts = [len(pool[s]) for s in sources]  # too few positions: repeat with angles
        train_src, test_src = _split_sources(
            sources, counts, train_quota[label], test_quota[label], rng
        )
        train += _draw_chunks(manifest, pool, train_src, train_quota[label], rng, policy)
        test += _draw_chunks(manifest, pool, test_src, test_quota[label], rng, policy)
    return sorted(train), sorted(test)


def sources_per_class(manifest: Manifest, ids: list[int]) -> dict[str, int | float]:
    """Distinct source images per class among the given fragments: the least and the mean over
    all classes (a class without fragments counts 0)."""
    seen: list[set[int]] = [set() for _ in manifest.classes]
    for fragment in map(manifest.fragment, ids):
        seen[fragment.label].add(fragment.source)
    counts = [len(sources) for sources in seen]
    return {"min": min(counts), "mean": sum(counts) / len(counts)}


def source_shortfall(manifest: Manifest) -> dict[str, int]:
    """Classes whose local train sets cannot span TARGET_SOURCES images, with how many they can:
    their non-holdout sources, less the one a local test needs at least."""
    pools = class_pools(manifest, holdout=False)
    return {
        name: len(pool) - 1
        for name, pool in zip(manifest.classes, pools, strict=True)
        if len(pool) - 1 < TARGET_SOURCES
    }


def heldout_set(manifest: Manifest, n: int, seed: int) -> list[int]:
    """A class-balanced sample (sorted ids) of at most n fragments of the held-out sources.

    `[data] heldout_test` is a cap: when the held-out images hold fewer fragments, every class
    contributes as many as the smallest class can, so the test set stays balanced.
    """
    if n < 0:
        raise UserError(f"[data] heldout_test must be >= 0, got {n}")
    pools = class_pools(manifest, holdout=True)
    smallest = min(sum(len(ids) for ids in pool.values()) for pool in pools)
    rng = _rng(seed)
    quota = class_quotas(min(n, smallest * len(pools)), len(manifest.classes), rng)
    chosen: list[int] = []
    for label, pool in enumerate(pools):
        chosen += _draw(pool, list(pool), quota[label], rng)
    return sorted(chosen)
