"""`dagtrain export`: a run's model as a file PyTorch (or ONNX Runtime) users load without dagtrain.

Each format carries what a user needs to feed the network as training did, as one JSON document
(`export_metadata`): class names in output order, input channels and size, the normalisation
(pixels p in 0..255 become (p / 255 - mean) / std, as node_payload.batches.to_tensor does) and
the tiling (tile, stride, reflection margin). A state_dict is a safetensors file (tensors only,
never a pickle) with the document in its metadata; a TorchScript file holds it as the extra file
`dagtrain.json`; an ONNX model as the metadata property `dagtrain`.
"""

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from node_payload.common.atomic_file import replacing
from node_payload.common.errors import UserError
from node_payload.common.tensor_io import save_tensors
from pipeline.inference import EXPORT_FORMATS
from pipeline.inference.run_model import RunModel, check_output, load_model

EXPORT_FORMAT = "dagtrain-export/1"
METADATA_KEY = "dagtrain"
EXTRA_FILE = "dagtrain.json"
# to_tensor maps 0..255 to [-1, 1]: x / 127.5 - 1 = (x / 255 - 0.5) / 0.5
MEAN, STD = 0.5, 0.5


def export_metadata(run: RunModel) -> dict[str, Any]:
    """What a user of the exported network needs to know to use it as the run did."""
    tiling, channels = run.tiling, run.channels
    return {
        "format": EXPORT_FORMAT,
        "run": run.config.run.name,
        "round": run.version,
        "arch": run.config.model.arch,
        "classes": run.classes,
        "in_channels": channels,
        "image_size": run.image_size,
        "mean": [MEAN] * channels,
        "std": [STD] * channels,
        "input": (
            "float32 N x in_channels x image_size x image_size: pixels p in 0..255 (16-bit "
            "images: p / 257) as (p / 255 - mean) / std; tiles resized to image_size (bilinear, "
            "antialias) when tile differs"
        ),
        "output": "logits N x classes; an image's class: the argmax of its tiles' mean softmax",
        "tile": tiling.tile,
        "stride": tiling.stride,
        "margin": tiling.margin,
        "mode": tiling.mode,
    }


def _state_dict(run: RunModel, out: Path, metadata: str) -> None:
    state = {k: v.detach().contiguous() for k, v in run.model.state_dict().items()}
    save_tensors(out, state, {"format": EXPORT_FORMAT, METADATA_KEY: metadata})


def _torchscript(run: RunModel, out: Path, metadata: str) -> None:
    with warnings.catch_warnings(), replacing(out) as tmp:
        warnings.filterwarnings("ignore", "`torch.jit", FutureWarning)  # the format asked for
        torch.jit.save(torch.jit.script(run.model), str(tmp), _extra_files={EXTRA_FILE: metadata})


def _onnx(run: RunModel, out: Path, metadata: str) -> None:
    try:
        import onnx
    except ImportError:
        raise UserError(
            "--format onnx needs the onnx package: pip install 'dagtrain[onnx]' (onnx and "
            "onnxruntime), or export another format"
        ) from None
    size = run.image_size
    example = torch.zeros(1, run.channels, size, size)
    with replacing(out) as tmp:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(
                run.model,
                (example,),
                str(tmp),
                dynamo=False,  # the TorchScript exporter: the other one needs onnxscript too
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
        model = onnx.load(str(tmp))
        model.metadata_props.add(key=METADATA_KEY, value=metadata)
        onnx.save(model, str(tmp))


_WRITERS: dict[str, Callable[[RunModel, Path, str], None]] = dict(
    zip(EXPORT_FORMATS, (_state_dict, _torchscript, _onnx), strict=True)
)


def export(run: RunModel | Path, format: str, out: Path, round: int | None = None) -> Path:
    """Write a run's model (a RunModel, or a run directory and `round`, by default its last
    model) to `out` in `format` (state_dict, torchscript or onnx); returns the file."""
    if format not in _WRITERS:
        raise UserError(f"--format {format!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    if not isinstance(run, RunModel):
        run = load_model(run, round)
    out = check_output(run.run_dir, out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; name the file to write")
    metadata = json.dumps(export_metadata(run))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _WRITERS[format](run, out, metadata)
    except OSError as exc:
        raise UserError(
            f"{out}: cannot write the export ({exc.strerror}); choose another --out"
        ) from None
    return out
