import hashlib
import re
import time

import pytest

from node_payload.errors import UserError
from node_payload.manifest import COLUMNS, FORMAT, Fragment, Manifest, Source, encode

SHA = "ab" * 32


def make_doc() -> dict:
    return {
        "format": FORMAT,
        "tile": 32,
        "overlap": 0.5,
        "holdout": 0.25,
        "seed": 7,
        "mode": "RGB",
        "classes": ["a", "b"],
        "sources": [
            {"path": "a/1.png", "label": 0, "width": 64, "height": 48, "holdout": False},
            {"path": "b/1.png", "label": 1, "width": 32, "height": 32, "holdout": True},
        ],
        "shards": [
            {"path": "shards/s00000.bin", "bytes": 22, "sha256": SHA},
            {"path": "shards/s00001.bin", "bytes": 9, "sha256": SHA},
        ],
        "fragments": {
            "columns": COLUMNS,
            "rows": [
                [0, 0, 0, 0, 0, 10, SHA],
                [0, 32, 16, 0, 10, 12, SHA],
                [1, 0, 0, 1, 0, 9, SHA],
            ],
        },
    }


def test_round_trip_exposes_the_model():
    data = encode(make_doc())
    manifest = Manifest.from_bytes(data, "m.json")
    assert manifest.classes == ["a", "b"]
    assert (manifest.tile, manifest.mode, manifest.seed) == (32, "RGB", 7)
    assert manifest.sources[1] == Source("b/1.png", 1, 32, 32, True)
    assert manifest.fragments[1] == Fragment(1, 0, 0, 32, 16, "shards/s00000.bin", 10, 12, SHA)
    assert manifest.fragments[2].label == 1 and manifest.fragments[2].shard == "shards/s00001.bin"
    assert manifest.by_source() == {0: [0, 1], 1: [2]}
    assert manifest.digest() == hashlib.sha256(data).hexdigest()
    assert manifest.to_bytes() == data


def test_load_reads_a_file_and_names_it_in_errors(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_bytes(encode(make_doc()))
    assert len(Manifest.load(path).fragments) == 3
    path.write_text("{not json")
    with pytest.raises(UserError, match=re.escape(str(path))):
        Manifest.load(path)
    with pytest.raises(UserError, match="cannot read"):
        Manifest.load(tmp_path / "missing.json")


@pytest.mark.parametrize("shard", ["../outside.bin", "shards/../../x.bin", "/etc/passwd", "C:x"])
def test_shard_paths_must_stay_inside_the_root(shard):
    doc = make_doc()
    doc["shards"][1]["path"] = shard
    with pytest.raises(UserError) as error:
        Manifest.from_bytes(encode(doc), "data/manifest.json")
    assert "data/manifest.json" in str(error.value) and repr(shard) in str(error.value)


def corrupt(edit):
    doc = make_doc()
    edit(doc)
    return encode(doc)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format="dagtrain-dataset/2"), "format"),
        (lambda d: d.update(mode="CMYK"), "mode"),
        (lambda d: d.update(tile=0), "tile"),
        (lambda d: d.update(overlap=1.0), "overlap"),
        (lambda d: d.update(seed=True), "seed"),
        (lambda d: d.update(classes=["b", "a"]), "classes"),
        (lambda d: d.update(extra=1), "unknown keys"),
        (lambda d: d.pop("holdout"), "missing keys"),
        (lambda d: d["fragments"].update(columns=COLUMNS[::-1]), "columns"),
        (lambda d: d["sources"][0].update(label=2), "label"),
        (lambda d: d["sources"][0].update(path="/abs.png"), "path"),
        (lambda d: d["sources"][0].update(holdout=0), "holdout"),
        (lambda d: d["fragments"]["rows"][0].__setitem__(0, 5), "source 5 does not exist"),
        (lambda d: d["fragments"]["rows"][1].__setitem__(1, 33), "outside a/1.png"),
        (lambda d: d["fragments"]["rows"][0].__setitem__(3, 2), "shard 2"),
        (lambda d: d["fragments"]["rows"][0].__setitem__(5, 0), "offset/length"),
        (lambda d: d["fragments"]["rows"][0].__setitem__(6, "AB" * 32), "sha256"),
        (lambda d: d["fragments"]["rows"].pop(), "'b/1.png' has no fragments"),
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


def test_fifty_thousand_fragments_load_quickly():
    doc = make_doc()
    doc["sources"] = [
        {"path": f"c/{i}.png", "label": i % 2, "width": 1000, "height": 1000, "holdout": False}
        for i in range(50)
    ]
    doc["fragments"]["rows"] = [
        [i // 1000, (i % 30) * 32, (i // 30 % 30) * 32, 0, i * 100, 100, SHA] for i in range(50_000)
    ]
    data = encode(doc)
    start = time.perf_counter()
    manifest = Manifest.from_bytes(data, "big.json")
    assert time.perf_counter() - start < 1.0
    assert len(manifest.fragments) == 50_000 and len(manifest.by_source()[49]) == 1000
