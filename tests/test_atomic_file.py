"""The one atomic write: a file is replaced whole or not at all, and leaves nothing behind."""

from pathlib import Path

import pytest

from node_payload.common.atomic_file import replacing, write_text


def test_write_text_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("old\n")
    write_text(path, "new\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text("old\n")
    with pytest.raises(RuntimeError), replacing(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed while writing")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_the_temporary_file_is_hidden_beside_the_target(tmp_path: Path) -> None:
    """Beside it, so the rename stays on one file system; hidden, so no glob of the folder's
    files (models/*.safetensors) ever picks a half-written one."""
    with replacing(tmp_path / "global_r001.safetensors") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".global_r001.safetensors.")
        tmp.write_bytes(b"x")
    assert (tmp_path / "global_r001.safetensors").read_bytes() == b"x"
