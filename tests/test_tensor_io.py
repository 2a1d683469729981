import pytest
import torch

from node_payload.common import tensor_io
from node_payload.common.tensor_io import BadTensorFile


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "fc.weight": torch.randn(6, 4),
        "fc.bias": torch.randn(6),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "half": torch.randn(3, dtype=torch.bfloat16),
    }


def test_round_trip_keeps_values_dtypes_and_metadata(tmp_path):
    path = tmp_path / "model.safetensors"
    meta = tensor_io.model_metadata(3, "smallcnn", 6, 3, 64)
    tensor_io.save_tensors(path, _tensors(), meta)
    tensors, metadata = tensor_io.load_tensors(path)
    assert metadata == meta
    assert tensors.keys() == _tensors().keys()
    for name, tensor in _tensors().items():
        assert tensors[name].dtype == tensor.dtype
        assert torch.equal(tensors[name], tensor)
    assert tensor_io.read_metadata(path) == meta


def test_non_contiguous_tensor_is_saved(tmp_path):
    path = tmp_path / "t.safetensors"
    transposed = torch.arange(6.0).reshape(2, 3).t()
    tensor_io.save_tensors(path, {"t": transposed}, {})
    assert torch.equal(tensor_io.load_tensors(path)[0]["t"], transposed)


def test_save_replaces_atomically_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "model.safetensors"
    tensor_io.save_tensors(path, {"a": torch.zeros(2)}, {"version": "0"})
    tensor_io.save_tensors(path, {"a": torch.ones(2)}, {"version": "1"})
    assert tensor_io.read_metadata(path) == {"version": "1"}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_failed_save_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.safetensors"
    tensor_io.save_tensors(path, {"a": torch.zeros(2)}, {"version": "0"})
    shared = torch.zeros(4)
    with pytest.raises(RuntimeError):  # safetensors refuses tensors sharing memory
        tensor_io.save_tensors(path, {"a": shared, "b": shared}, {"version": "1"})
    assert tensor_io.read_metadata(path) == {"version": "0"}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_open_lazy_streams_by_name(tmp_path):
    path = tmp_path / "u.safetensors"
    meta = tensor_io.update_metadata(2, 5, 480, 2)
    tensor_io.save_tensors(path, _tensors(), meta)
    with tensor_io.open_lazy(path) as f:
        assert sorted(f.names) == sorted(_tensors())
        assert f.metadata == meta
        assert torch.equal(f.get("fc.bias"), _tensors()["fc.bias"])


def test_metadata_helpers_follow_the_contract():
    assert tensor_io.update_metadata(3, 2, 480, 3) == {
        "format": "dagtrain-update/1",
        "round": "3",
        "node": "2",
        "samples": "480",
        "base_version": "3",
    }
    assert tensor_io.model_metadata(3, "resnet18", 6, 1, 64) == {
        "format": "dagtrain-model/1",
        "version": "3",
        "arch": "resnet18",
        "num_classes": "6",
        "in_channels": "1",
        "image_size": "64",
    }
    assert tensor_io.residual_metadata("abc123", 4, 7, 9) == {
        "format": "dagtrain-residual/1",
        "run_id": "abc123",
        "lane": "4",
        "jobs": "7",
        "round": "9",
    }


def test_bad_tensor_file_is_a_value_error_and_missing_file_is_not(tmp_path):
    assert issubclass(BadTensorFile, ValueError)
    with pytest.raises(FileNotFoundError):
        tensor_io.load_tensors(tmp_path / "absent.safetensors")


def test_same_tensors_give_same_bytes(tmp_path):
    # safetensors orders metadata by a hash seeded anew for every file it writes: unsorted, 8
    # files of 6 metadata keys would almost surely not all agree (pool and local runs must).
    paths = [tmp_path / f"m{i}.safetensors" for i in range(8)]
    for path in paths:
        tensor_io.save_tensors(path, _tensors(), tensor_io.model_metadata(3, "smallcnn", 6, 3, 64))
    assert len({path.read_bytes() for path in paths}) == 1
