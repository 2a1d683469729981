"""Global model files: the weights plus what is needed to rebuild the network around them."""

from pathlib import Path

from torch import nn

from node_payload.common.errors import UserError
from node_payload.common.models import build_model
from node_payload.common.tensor_io import MODEL_FORMAT, load_tensors, save_tensors


def save_model(path: Path, model: nn.Module, metadata: dict[str, str]) -> None:
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    save_tensors(path, state, metadata)


def load_model(path: Path) -> tuple[nn.Module, dict[str, str]]:
    """Rebuild the network named in the file's metadata and load its weights strictly."""
    tensors, metadata = load_tensors(path)
    if metadata.get("format") != MODEL_FORMAT:
        raise UserError(f"{path}: not a dagtrain model file (format {metadata.get('format')!r})")
    model = build_model(
        metadata["arch"], int(metadata["num_classes"]), int(metadata["in_channels"])
    )
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{path}: weights do not fit {metadata['arch']}: {exc}") from None
    return model, metadata
