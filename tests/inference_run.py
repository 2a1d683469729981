"""Small runs for the inference tests: planned over a lossless dataset (its stored pixels are the
source's exactly) and given "trained" models without training: the initial weights, a little
perturbed, saved as the global models of later rounds, so a run is ready in about a second."""

from pathlib import Path

import torch

from node_payload.common.model_file import load_model, save_model
from node_payload.common.run_layout import model_path
from node_payload.common.tensor_io import model_metadata
from pipeline.planner import plan_from_file


def plan_run(root: Path, dataset: Path, arch: str = "smallcnn", rounds: int = 2) -> Path:
    """A planned run over `dataset` with global models r000 and r001 .. r{rounds - 1}."""
    config = root / "run.toml"
    config.write_text(
        f'[run]\nname = "infer"\nnodes = 2\nrounds = {rounds}\n'
        f'[data]\ndataset = "{dataset}"\nlocal_train = 32\nlocal_test = 16\nheldout_test = 16\n'
        f'[model]\narch = "{arch}"\n'
        "[train]\nbatch_size = 16\n"
    )
    run_dir = plan_from_file(config, root / "run")
    model, metadata = load_model(model_path(run_dir, 0))
    generator = torch.Generator().manual_seed(0)
    for version in range(1, rounds):
        with torch.no_grad():
            for weight in model.parameters():
                weight.mul_(1 + 0.05 * torch.randn(weight.shape, generator=generator))
        meta = model_metadata(
            version,
            metadata["arch"],
            int(metadata["num_classes"]),
            int(metadata["in_channels"]),
            int(metadata["image_size"]),
        )
        save_model(model_path(run_dir, version), model, meta)
    return run_dir
