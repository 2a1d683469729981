import hashlib
import random
import re
import time

import pytest
from blake3 import blake3

from node_payload.common.errors import UserError
from node_payload.common.manifest import (
    FORMAT,
    FORMAT_SHA256,
    HASH_HEX,
    Fragment,
    Manifest,
    encode,
    margin_for,
)

H = "ab" * (HASH_HEX // 2)


def source(path: str, label: int, width: int, height: int, holdout: bool, shard: int = 0):
    """A source entry with valid block lengths/hashes for tile 32, margin 24, block 128."""
    blocks = -(-(width + 48) // 128) * -(-(height + 48) // 128)
    return {
        "path": path,
        "label": label,
        "width": width,
        "height": height,
        "holdout": holdout,
        "shard": shard,
        "offset": 0,
        "lengths": [10] * blocks,
        "hashes": H * blocks,
    }


def make_doc() -> dict:
    return {
        "format": FORMAT,
        "block_hash": "blake3",
        "tile": 32,
        "overlap": 0.5,
        "stride": 16,
        "margin": margin_for(32),
        "block": 128,
        "angles": [0, 360, 90],
        "codec": "jpeg",
        "holdout": 0.25,
        "seed": 7,
        "mode": "RGB",
        "classes": ["a", "b"],
        "sources": [source("a/1.png", 0, 64, 48, False), source("b/1.png", 1, 32, 32, True, 1)],
        "shards": [
            {"path": "shards/s00000.bin", "bytes": 40, "sha256": "0" * 64},
            {"path": "shards/s00001.bin", "bytes": 10, "sha256": "1" * 64},
        ],
    }


def test_margin_gives_a_context_of_at_least_tile_sqrt2():
    for tile in (8, 32, 64, 256, 1000):
        assert tile + 2 * margin_for(tile) >= tile * 2**0.5 + 2


def test_round_trip_exposes_the_index():
    data = encode(make_doc())
    manifest = Manifest.from_bytes(data, "m.json")
    assert manifest.classes == ["a", "b"] and manifest.angles == [0, 90, 180, 270]
    # a/1.png: (64-32)//16+1 = 3 x (48-32)//16+1 = 2 positions; b/1.png: 1 position
    assert len(manifest) == (3 * 2 + 1) * 4
    assert manifest.by_source() == {0: range(0, 24), 1: range(24, 28)}
    # id = (position * n_angles + angle index): position 4 = (px 1, py 1), angle index 2
    assert manifest.fragment(4 * 4 + 2) == Fragment(18, 0, 0, 16, 16, 180)
    assert manifest.fragment(27) == Fragment(27, 1, 1, 0, 0, 270)
    assert manifest.position_of(27) == 6
    with pytest.raises(IndexError):
        manifest.fragment(28)
    assert manifest.digest() == hashlib.sha256(data).hexdigest()
    assert manifest.to_bytes() == data


def test_blocks_cover_the_context():
    doc = make_doc()
    doc["sources"][0] = source("a/1.png", 0, 300, 48, False)
    doc["sources"][0]["lengths"] = [10, 11, 12]
    manifest = Manifest.from_bytes(encode(doc), "m.json")
    assert manifest.context == 32 + 2 * margin_for(32)
    blocks, origin = manifest.blocks(manifest.fragment(0))
    assert [b.id for b in blocks] == [0] and origin == (0, 0)
    # x = 112: context 112..191 spans blocks 0 and 1 of the first row
    frag = next(f for f in map(manifest.fragment, range(len(manifest))) if f.x == 112)
    blocks, origin = manifest.blocks(frag)
    assert [(b.id, b.offset, b.length, b.digest, b.hash_name) for b in blocks] == [
        (0, 0, 10, H, "blake3"),
        (1, 10, 11, H, "blake3"),
    ]
    assert origin == (112, 0)


@pytest.mark.parametrize(
    ("format_", "hex_digest"),
    [
        (FORMAT, lambda data: blake3(data).hexdigest()),
        (FORMAT_SHA256, lambda data: hashlib.sha256(data).hexdigest()),  # before block_hash
    ],
)
def test_blocks_are_checked_with_the_hash_the_manifest_names(format_, hex_digest):
    doc = make_doc() | {"format": format_}
    if format_ == FORMAT_SHA256:
        del doc["block_hash"]
    stored, other = b"x" * 10, b"y" * 10
    doc["sources"][0]["hashes"] = hex_digest(stored)[:HASH_HEX]  # its one block
    manifest = Manifest.from_bytes(encode(doc), "m.json")
    (block,), _ = manifest.blocks(manifest.fragment(0))
    assert block.hash_name == manifest.block_hash == ("blake3" if format_ == FORMAT else "sha256")
    assert block.matches(stored) and block.matches(memoryview(stored))
    assert not block.matches(other)


def test_a_sha256_prefix_does_not_pass_for_a_blake3_one():
    doc = make_doc()
    doc["sources"][0]["hashes"] = hashlib.sha256(b"x" * 10).hexdigest()[:HASH_HEX]
    (block,), _ = Manifest.from_bytes(encode(doc), "m.json").blocks(Fragment(0, 0, 0, 0, 0, 0))
    assert not block.matches(b"x" * 10)


def blocks_one_by_one(manifest: Manifest, ids) -> list:
    """The per-fragment path: every fragment's blocks, deduplicated, by block id."""
    blocks = {b.id: b for i in ids for b in manifest.blocks(manifest.fragment(int(i)))[0]}
    return [blocks[k] for k in sorted(blocks)]


def test_blocks_under_matches_the_per_fragment_lookup():
    doc = make_doc()
    doc["block"] = 40  # several blocks per context side, partial blocks at the edges
    doc["sources"] = [source("a/1.png", 0, 300, 200, False), source("b/1.png", 1, 90, 70, False, 1)]
    for i, src in enumerate(doc["sources"]):
        pad = 2 * doc["margin"]
        n = -(-(src["width"] + pad) // 40) * -(-(src["height"] + pad) // 40)
        src["lengths"] = [10 + (7 * k + i) % 13 for k in range(n)]
        src["hashes"] = "".join(f"{k:0{HASH_HEX}x}" for k in range(n))
        src["offset"] = 5 * i
        doc["shards"][i]["bytes"] = src["offset"] + sum(src["lengths"])
    manifest = Manifest.from_bytes(encode(doc), "m.json")
    rng = random.Random(0)
    everything = range(len(manifest))
    for ids in ([], [0], list(everything), rng.sample(everything, 50), [3, 3, 1]):
        assert manifest.blocks_under(ids) == blocks_one_by_one(manifest, ids)
    with pytest.raises(IndexError, match=str(len(manifest))):
        manifest.blocks_under([0, len(manifest)])


def test_blocks_under_matches_on_a_prepared_dataset(tiny_dataset):
    manifest = Manifest.load(tiny_dataset / "manifest.json")
    ids = random.Random(1).sample(range(len(manifest)), 500)
    assert manifest.blocks_under(ids) == blocks_one_by_one(manifest, ids)


def test_files_lists_the_shards():
    files = Manifest.from_bytes(encode(make_doc()), "m.json").files()
    assert [(f.path, f.bytes) for f in files] == [
        ("shards/s00000.bin", 40),
        ("shards/s00001.bin", 10),
    ]


def test_load_reads_a_file_and_names_it_in_errors(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_bytes(encode(make_doc()))
    assert len(Manifest.load(path)) == 28
    path.write_text("{not json")
    with pytest.raises(UserError, match=re.escape(str(path))):
        Manifest.load(path)
    with pytest.raises(UserError, match="cannot read"):
        Manifest.load(tmp_path / "missing.json")


def corrupt(edit):
    doc = make_doc()
    edit(doc)
    return encode(doc)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format="dagtrain-dataset/1"), "format"),
        (lambda d: d.update(block_hash="md5"), "block_hash must be one of ['blake3', 'sha256']"),
        (lambda d: d.update(block_hash=None), "block_hash must be one of"),
        (lambda d: d.pop("block_hash"), "missing keys ['block_hash']"),
        (lambda d: d.update(format=FORMAT_SHA256), "unknown keys ['block_hash']"),
        (lambda d: d.update(mode="CMYK"), "mode"),
        (lambda d: d.update(tile=0), "tile"),
        (lambda d: d.update(overlap=1.0), "overlap"),
        (lambda d: d.update(stride=17), "stride"),
        (lambda d: d.update(margin=3), "margin"),
        (lambda d: d.update(angles=[0, 400, 5]), "angles"),
        (lambda d: d.update(angles="0:360:5"), "angles"),
        (lambda d: d.update(codec="gif"), "codec"),
        (lambda d: d.update(seed=True), "seed"),
        (lambda d: d.update(classes=["b", "a"]), "classes"),
        (lambda d: d.update(extra=1), "unknown keys"),
        (lambda d: d.pop("holdout"), "missing keys"),
        (lambda d: d["sources"][0].update(label=2), "label"),
        (lambda d: d["sources"][0].update(holdout=0), "holdout"),
        (lambda d: d["sources"][0].update(width=20), "width"),
        (lambda d: d["sources"][0].update(shard=2), "shard 2"),
        (lambda d: d["sources"][0]["lengths"].pop(), "lengths"),
        (lambda d: d["sources"][0].update(offset=35), "outside shards/s00000.bin"),
        (lambda d: d["sources"][0].update(hashes="AB" * 16), "hashes"),
        (lambda d: d["shards"][0].update(sha256="x"), "sha256"),
        (lambda d: d["shards"][0].update(bytes=-1), "bytes"),
    ],
)
def test_invalid_manifests_are_rejected_with_the_reason(edit, message):
    with pytest.raises(UserError, match=r"m\.json") as error:
        Manifest.from_bytes(corrupt(edit), "m.json")
    assert message in str(error.value)


def test_invalid_json_is_a_user_error():
    with pytest.raises(UserError, match="not a valid JSON"):
        Manifest.from_bytes(b"\xff\xfe", "m.json")
    with pytest.raises(UserError, match="JSON object"):
        Manifest.from_bytes(b"[]", "m.json")


def test_the_reference_dataset_size_loads_quickly_without_one_row_per_fragment():
    """654 sources of 2272 x 1704, tile 256, overlap 0.5, 72 angles: 192 x 72 fragments each."""
    doc = make_doc() | {
        "tile": 256,
        "stride": 128,
        "margin": margin_for(256),
        "angles": [0, 360, 5],
    }
    blocks = -(-(2272 + 2 * doc["margin"]) // 128) * -(-(1704 + 2 * doc["margin"]) // 128)
    doc["sources"] = [
        {
            **source(f"c/{i}.png", i % 2, 2272, 1704, False),
            "lengths": [10] * blocks,
            "hashes": H * blocks,
        }
        for i in range(654)
    ]
    doc["shards"] = [{**doc["shards"][0], "bytes": 10 * blocks}]
    start = time.perf_counter()
    manifest = Manifest.from_bytes(encode(doc), "m.json")
    assert time.perf_counter() - start < 5
    assert len(manifest) == 654 * 192 * 72 == 9_040_896
