"""The held-out evaluation's faster copy of a model: the same outputs, and the model it copies
is left as training found it."""

import torch
from torch import nn

from aggregation.heldout_metrics import MAX_BATCH, batch_size_for, inference_copy, logits
from node_payload.common.models import SmallCNN


def _trained_statistics(model: nn.Module) -> nn.Module:
    """BatchNorm statistics and affine weights far from their initial values, as after training."""
    torch.manual_seed(3)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.2, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.3, 0.3)
    return model


def test_the_copy_scores_as_the_model_in_eval_mode_does() -> None:
    model = _trained_statistics(SmallCNN(5, 3))
    x = torch.rand(70, 3, 32, 32)  # two batches, the second short
    model.eval()
    with torch.no_grad():
        expected = model(x)
    got = logits(inference_copy(model), x, 5)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(dim=1), expected.argmax(dim=1))


def test_the_model_keeps_its_mode_layout_and_layers() -> None:
    model = _trained_statistics(SmallCNN(4, 1)).train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    inference_copy(model)
    assert model.training
    assert all(isinstance(block[1], nn.BatchNorm2d) for block in model.features[:4])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]) and tensor.is_contiguous(), name


def test_batchnorm_without_running_statistics_is_not_folded() -> None:
    # Such a layer normalises every batch by the batch's own statistics, even in eval mode.
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False))
    x = torch.rand(8, 1, 6, 6)
    with torch.no_grad():
        expected = model.eval()(x)
    fast = inference_copy(model)
    assert isinstance(fast[1], nn.BatchNorm2d)
    torch.testing.assert_close(logits(fast, x, 2), expected)


def test_no_samples_give_no_rows() -> None:
    assert logits(inference_copy(SmallCNN(3, 1)), torch.empty(0, 1, 16, 16), 3).shape == (0, 3)


def test_rows_per_pass_shrink_as_the_tiles_grow() -> None:
    fast = inference_copy(SmallCNN(3, 3))
    # smallcnn's largest activation is its first convolution's: 24 channels x the tile, float32
    assert batch_size_for(fast, (3, 32, 32)) == MAX_BATCH
    assert batch_size_for(fast, (3, 128, 128)) == (16 << 20) // (24 * 128 * 128 * 4)
    assert batch_size_for(fast, (3, 256, 256)) == 2
    assert batch_size_for(fast, (3, 2048, 2048)) == 1
    assert not any(m._forward_hooks for m in fast.modules())  # the hooks are gone


def test_any_batch_size_gives_the_same_outputs() -> None:
    fast = inference_copy(_trained_statistics(SmallCNN(4, 3)))
    x = torch.rand(9, 3, 48, 48)
    one_by_one = logits(fast, x, 4, batch_size=1)
    torch.testing.assert_close(logits(fast, x, 4), one_by_one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(fast, x, 4, batch_size=4), one_by_one, rtol=1e-5, atol=1e-5)
