import hashlib
import math
from collections import Counter

import pytest

from node_payload.common.errors import UserError
from node_payload.common.manifest import FORMAT, HASH_HEX, Manifest, encode, margin_for
from node_payload.sampling import (
    TARGET_SOURCES,
    ChunkPolicy,
    check_capacity,
    heldout_set,
    local_sets,
    node_seed,
    source_shortfall,
    sources_per_class,
)


def make_manifest(
    counts: dict[str, list[int]], holdout: dict[str, int], angles: int = 1
) -> Manifest:
    """Per class the position count of each source (n x 1 positions of tile 64, no overlap),
    each with `angles` angles; the first holdout[c] sources are held out."""
    sources = []
    margin = margin_for(64)
    for label, name in enumerate(sorted(counts)):
        for i, n in enumerate(counts[name]):
            blocks = -(-(64 * n + 2 * margin) // 128) * -(-(64 + 2 * margin) // 128)
            sources.append(
                {
                    "path": f"{name}/{i}.png",
                    "label": label,
                    "width": 64 * n,
                    "height": 64,
                    "holdout": i < holdout.get(name, 0),
                    "shard": 0,
                    "offset": 0,
                    "lengths": [1] * blocks,
                    "hashes": "0" * HASH_HEX * blocks,
                }
            )
    doc = {
        "format": FORMAT,
        "block_hash": "blake3",
        "tile": 64,
        "overlap": 0.0,
        "stride": 64,
        "margin": margin,
        "block": 128,
        "angles": [0, 360, 360 // angles],
        "codec": "jpeg",
        "holdout": 0.25,
        "seed": 0,
        "mode": "L",
        "classes": sorted(counts),
        "sources": sources,
        "shards": [{"path": "shards/s00000.bin", "bytes": 10**6, "sha256": "0" * 64}],
    }
    return Manifest.from_bytes(encode(doc), "test-manifest.json")


UNEVEN = make_manifest(
    {"a": [9, 20, 12, 7, 15], "b": [30, 8, 8, 25], "c": [10, 10, 10, 3, 40, 6]},
    {"a": 1, "b": 1, "c": 2},
)


def source_of(manifest: Manifest, ids: list[int]) -> set[int]:
    return {manifest.fragment(i).source for i in ids}


def assert_balanced(manifest: Manifest, ids: list[int], n: int) -> None:
    per_class = Counter(manifest.fragment(i).label for i in ids)
    k = len(manifest.classes)
    assert len(ids) == n == sum(per_class.values())
    assert all(n // k <= per_class[c] <= math.ceil(n / k) for c in range(k))


def test_node_seed_is_stable_and_distinct():
    digest = hashlib.sha256(b"dagtrain-node/5/2/3").digest()
    assert node_seed(5, 2, 3) == int.from_bytes(digest[:8], "big") & (2**63 - 1)
    seeds = {node_seed(run, r, n) for run in range(3) for r in range(10) for n in range(10)}
    assert len(seeds) == 300
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("seed", range(200))
def test_local_sets_properties(seed):
    train, test = local_sets(UNEVEN, seed, n_train=32, n_test=13)
    assert_balanced(UNEVEN, train, 32)
    assert_balanced(UNEVEN, test, 13)
    assert len(set(train)) == 32 and len(set(test)) == 13
    assert train == sorted(train) and test == sorted(test)
    train_sources, test_sources = source_of(UNEVEN, train), source_of(UNEVEN, test)
    assert not train_sources & test_sources
    assert not any(UNEVEN.sources[s].holdout for s in train_sources | test_sources)
    assert local_sets(UNEVEN, seed, 32, 13) == (train, test)


def test_local_sets_vary_with_the_seed():
    draws = {tuple(local_sets(UNEVEN, seed, 12, 6)[0]) for seed in range(20)}
    assert len(draws) == 20
    splits = {frozenset(source_of(UNEVEN, local_sets(UNEVEN, s, 3, 3)[1])) for s in range(50)}
    assert len(splits) > 10


def test_extra_fragments_go_to_random_classes():
    extra = Counter()
    for seed in range(60):
        train, _ = local_sets(UNEVEN, seed, 31, 0)
        counts = Counter(UNEVEN.fragment(i).label for i in train)
        extra.update(c for c in range(3) if counts[c] == 11)
    assert sum(extra.values()) == 60 and all(extra[c] > 0 for c in range(3))


@pytest.mark.parametrize("seed", range(30))
def test_exact_capacity_needs_the_right_split(seed):
    # Only {5, 3} + {7} (train 8, test 7) fits; most permutation cuts do not.
    tight = make_manifest({"x": [7, 5, 3], "y": [7, 5, 3]}, {})
    train, test = local_sets(tight, seed, 16, 14)
    assert_balanced(tight, train, 16)
    assert_balanced(tight, test, 14)
    assert not source_of(tight, train) & source_of(tight, test)


def test_too_few_sources_names_the_class():
    manifest = make_manifest({"a": [5, 5, 5], "b": [5, 5]}, {"b": 1})
    with pytest.raises(UserError, match="class 'b' has 1 non-holdout source"):
        check_capacity(manifest, 2, 2)
    with pytest.raises(UserError, match="class 'b'"):
        local_sets(manifest, 0, 2, 2)


def test_too_many_fragments_names_class_numbers_and_fix():
    with pytest.raises(UserError) as error:
        local_sets(UNEVEN, 0, n_train=90, n_test=60)
    message = str(error.value)
    assert "class 'b'" in message and "30 local-train and 20 local-test" in message
    assert "41 fragments" in message and "[data] local_train/local_test" in message
    check_capacity(UNEVEN, 51, 30)  # b: 17 train + 10 test fits only as 25 | 8 + 8
    with pytest.raises(UserError, match="class 'a'"):
        check_capacity(UNEVEN, 3 * 21, 3 * 34)


def test_invalid_sizes_are_rejected():
    with pytest.raises(UserError):
        check_capacity(UNEVEN, 0, 5)
    with pytest.raises(UserError):
        local_sets(UNEVEN, -1, 5, 5)


@pytest.mark.parametrize("seed", range(50))
def test_heldout_set_is_balanced_over_holdout_sources(seed):
    ids = heldout_set(UNEVEN, 20, seed)
    assert_balanced(UNEVEN, ids, 20)
    assert len(set(ids)) == 20
    assert all(UNEVEN.sources[s].holdout for s in source_of(UNEVEN, ids))
    assert heldout_set(UNEVEN, 20, seed) == ids


def test_heldout_size_is_a_cap_that_keeps_classes_balanced():
    assert len(heldout_set(UNEVEN, 24, 0)) == 24  # class b holds 30, a 9 -> 8 each fits
    capped = heldout_set(UNEVEN, 30, 0)  # class a holds only 9: 9 of each of the 3 classes
    labels = Counter(UNEVEN.fragment(i).label for i in capped)
    assert len(capped) == 27 and set(labels.values()) == {9}


ROTATED = make_manifest(
    {"a": [192] * 12, "b": [98] * 9 + [192] * 3, "c": [192] * 10}, {"a": 3, "b": 3, "c": 2}, 72
)


@pytest.mark.parametrize("seed", range(40))
def test_rotated_index_keeps_every_guarantee(seed):
    """Microscopy scale (192 or 98 positions x 72 angles per source), drawn from the index."""
    assert len(ROTATED) == (192 * 25 + 98 * 9) * 72
    train, test = local_sets(ROTATED, seed, n_train=384, n_test=96)
    assert_balanced(ROTATED, train, 384)
    assert_balanced(ROTATED, test, 96)
    assert len(set(train)) == 384 and len(set(test)) == 96
    assert not source_of(ROTATED, train) & source_of(ROTATED, test)
    held = {i for i, s in enumerate(ROTATED.sources) if s.holdout}
    assert not (source_of(ROTATED, train) | source_of(ROTATED, test)) & held
    assert source_of(ROTATED, heldout_set(ROTATED, 600, seed)) <= held


def test_many_nodes_and_rounds_cover_the_training_positions():
    manifest = make_manifest({"a": [6] * 4, "b": [5] * 4}, {"a": 1, "b": 1}, 8)
    training = {
        manifest.position_of(i)
        for s, ids in manifest.by_source().items()
        if not manifest.sources[s].holdout
        for i in ids
    }
    seen: set[int] = set()
    for seed in range(60):
        train, _ = local_sets(manifest, seed, n_train=16, n_test=4)
        seen |= {manifest.position_of(i) for i in train}
    assert seen == training


def make_grid_manifest(per_class: int, side: int, holdout: int = 0, angles: int = 4) -> Manifest:
    """Two classes of per_class square sources of side x side positions (tile 64, stride 32)."""
    margin = margin_for(64)
    width = 64 + 32 * (side - 1)
    per_side = -(-(width + 2 * margin) // 128)
    sources = [
        {
            "path": f"{name}/{i}.png",
            "label": label,
            "width": width,
            "height": width,
            "holdout": i < holdout,
            "shard": 0,
            "offset": 0,
            "lengths": [1] * per_side**2,
            "hashes": "0" * HASH_HEX * per_side**2,
        }
        for label, name in enumerate(("a", "b"))
        for i in range(per_class)
    ]
    doc = {
        "format": FORMAT, "block_hash": "blake3", "tile": 64, "overlap": 0.5, "stride": 32,
        "margin": margin,
        "block": 128, "angles": [0, 360, 360 // angles], "codec": "jpeg", "holdout": 0.25,
        "seed": 0, "mode": "L", "classes": ["a", "b"], "sources": sources,
        "shards": [{"path": "shards/s00000.bin", "bytes": 10**6, "sha256": "0" * 64}],
    }  # fmt: skip
    return Manifest.from_bytes(encode(doc), "grid-manifest.json")


# 40 photos per class of 7 x 7 positions, 12 held out: the real-photograph case (28 to draw from).
PHOTOS = make_grid_manifest(40, 7, holdout=12)


@pytest.mark.parametrize("seed", range(20))
def test_local_train_spans_the_target_number_of_source_images(seed):
    """One machine draws batches from all of a class's images; a node's set spans 16 of them
    (whole-image chunks spanned 1 or 2), with one angle per position."""
    train, test = local_sets(PHOTOS, seed, n_train=200, n_test=40)
    assert sources_per_class(PHOTOS, train) == {"min": TARGET_SOURCES, "mean": TARGET_SOURCES}
    assert sources_per_class(PHOTOS, test)["min"] >= 2
    assert len({PHOTOS.position_of(i) for i in train}) == 200
    assert not source_of(PHOTOS, train) & source_of(PHOTOS, test)
    assert not any(PHOTOS.sources[s].holdout for s in source_of(PHOTOS, train + test))


def test_a_small_quota_takes_one_fragment_from_each_of_as_many_images():
    train, _ = local_sets(PHOTOS, 0, n_train=10, n_test=4)
    assert sources_per_class(PHOTOS, train) == {"min": 5, "mean": 5.0}


@pytest.mark.parametrize("seed", range(20))
def test_each_image_gives_one_compact_patch(seed):
    """Neighbouring positions share the blocks under their contexts: a chunk of n positions is
    a near-square patch, so its blocks stay few."""
    train, _ = local_sets(PHOTOS, seed, n_train=288, n_test=40)  # 144 a class: 9 per image
    by_source: dict[int, list] = {}
    for f in map(PHOTOS.fragment, train):
        by_source.setdefault(f.source, []).append(f)
    for frags in by_source.values():
        xs, ys = {f.x for f in frags}, {f.y for f in frags}
        assert len(frags) == 9 and len(xs) == len(ys) == 3
        assert max(xs) - min(xs) == max(ys) - min(ys) == 64


def test_fewer_sources_than_the_target_use_every_one_but_the_test_source():
    few = make_grid_manifest(6, 7)
    for seed in range(10):
        train, test = local_sets(few, seed, n_train=40, n_test=8)
        assert sources_per_class(few, train)["min"] == 5
        assert not source_of(few, train) & source_of(few, test)
    assert source_shortfall(few) == {"a": 5, "b": 5}
    assert source_shortfall(PHOTOS) == {}


def test_policies_change_the_spread_not_the_guarantees():
    run = ChunkPolicy(sources=0, min_chunk=49, shape="run")  # whole images in row order
    scatter = ChunkPolicy(sources=0, min_chunk=1, shape="scatter")
    for policy, spans in ((run, 2), (scatter, 25)):  # 25 of 28: test takes 3
        train, test = local_sets(PHOTOS, 3, 100, 10, policy)
        assert sources_per_class(PHOTOS, train)["min"] == spans
        assert_balanced(PHOTOS, train, 100)
        assert not source_of(PHOTOS, train) & source_of(PHOTOS, test)
        assert local_sets(PHOTOS, 3, 100, 10, policy) == (train, test)


def test_sources_per_class_counts_a_class_without_fragments_as_zero():
    some_a = [i for i in local_sets(PHOTOS, 0, 20, 4)[0] if PHOTOS.fragment(i).label == 0]
    assert sources_per_class(PHOTOS, some_a) == {"min": 0, "mean": 5.0}
    assert sources_per_class(PHOTOS, []) == {"min": 0, "mean": 0.0}


def test_sources_too_small_for_their_share_bring_in_more_sources():
    """30 one-position images a class: a quota of 20 needs 20 of them, not 16."""
    ones = make_manifest({"a": [1] * 30, "b": [1] * 30}, {}, angles=4)
    train, test = local_sets(ones, 0, n_train=40, n_test=4)
    assert sources_per_class(ones, train) == {"min": 20, "mean": 20.0}
    assert not source_of(ones, train) & source_of(ones, test)


@pytest.mark.parametrize("seed", range(10))
def test_a_quota_beyond_every_position_repeats_positions_at_distinct_angles(seed):
    small = make_manifest({"a": [2, 2, 2], "b": [2, 2, 2]}, {}, angles=8)
    train, _ = local_sets(small, seed, n_train=40, n_test=2)
    assert_balanced(small, train, 40)
    assert len(set(train)) == 40  # 20 a class from 4 positions: 5 distinct angles each


@pytest.mark.parametrize("bad", [{"min_chunk": 0}, {"sources": -1}, {"shape": "bands"}])
def test_a_policy_that_cannot_draw_is_refused(bad):
    with pytest.raises(ValueError, match="min_chunk >= 1"):
        ChunkPolicy(**bad)
