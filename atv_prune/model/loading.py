"""Loading a local checkpoint: devices, dtypes, the model and its processor, in one place.

Safetensors only, remote code off unless asked for. :func:`load_model_and_processor` is what every
command and study uses; :func:`model_skeleton` builds the architecture on the meta device for the
checks that need shapes but no weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AtvPruneError, ConfigError, UnsupportedModelError
from .families import supported_families

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str | None) -> torch.device:
    """The compute device: the one asked for, else CUDA when present, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}': use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' asked for but CUDA is not available: use --device cpu")
    return device


def compute_dtype(name: str, device: torch.device) -> torch.dtype | str:
    """``auto``: fp32 on the CPU (bf16 matmuls are ~10x slower there), the checkpoint's dtype elsewhere."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else "auto"
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype '{name}': choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def read_config(path: str | Path, trust_remote_code: bool = False) -> Any:
    """The transformers config of a local checkpoint folder, or a one-line error."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise AtvPruneError(f"no model found at {path} (config.json missing): pass a local checkpoint folder")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as error:
        raise UnsupportedModelError(
            f"cannot read the config in {path} ({str(error).splitlines()[0]}); "
            f"supported families: {supported_families()}; pass --trust-remote-code for custom code"
        ) from None


def _not_image_text_to_text(path: Path, config: Any, error: ValueError) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"model type '{config.model_type}' in {path} is not an image-text-to-text model transformers can load "
        f"({str(error).splitlines()[0]}); supported families: {supported_families()}"
    )


def model_skeleton(path: str | Path, trust_remote_code: bool = False) -> nn.Module | None:
    """The checkpoint's model built on the meta device (shapes, no weights, no memory), to check
    a run's inputs against the architecture before the weights are loaded. ``None`` for a model
    whose construction needs real tensors (custom code calling ``.item()`` while it builds): its
    checks then happen in the run itself."""
    from transformers import AutoModelForImageTextToText

    config = read_config(path, trust_remote_code)
    try:
        with torch.device("meta"):
            return AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as error:
        raise _not_image_text_to_text(Path(path), config, error) from None
    except Exception:  # noqa: BLE001 - any other construction failure: leave the checks to the run
        return None


def load_model(
    path: str | Path, dtype: torch.dtype | str = torch.float32, trust_remote_code: bool = False
) -> tuple[nn.Module, torch.dtype]:
    """Load an image-text-to-text model from a local folder onto the CPU, in eval mode.

    Returns the model and the dtype its checkpoint was saved in (to save the result alike).
    """
    from transformers import AutoModelForImageTextToText

    path = Path(path)
    config = read_config(path, trust_remote_code)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except ValueError as error:
        raise _not_image_text_to_text(path, config, error) from None
    except OSError as error:
        raise AtvPruneError(f"cannot load weights from {path}: {str(error).splitlines()[0]}") from None
    return model.eval(), saved_dtype_of(config, model)


def saved_dtype_of(config: Any, model: nn.Module) -> torch.dtype:
    """The dtype the checkpoint's weights were saved in (its config's), else the model's."""
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return saved if isinstance(saved, torch.dtype) else DTYPES.get(str(saved), next(model.parameters()).dtype)


@dataclass
class LoadedModel:
    """A checkpoint loaded for a run: the model (on the CPU, in eval mode), its processor, the dtype
    its weights were saved in (to save a result alike) and the run's compute device."""

    model: nn.Module
    processor: Any
    saved_dtype: torch.dtype
    device: torch.device


def load_model_and_processor(path: str | Path, *, dtype: str = "auto", device: str | None = None,
                             trust_remote_code: bool = False) -> LoadedModel:
    """The model and processor of a local checkpoint, in the compute dtype for ``device``
    (``dtype="auto"``: fp32 on the CPU, the checkpoint's own dtype on a GPU). The model stays on
    the CPU: the engine moves one block at a time, an evaluation moves it whole."""
    from .processors import load_processor

    compute = resolve_device(device)
    model, saved_dtype = load_model(path, compute_dtype(dtype, compute), trust_remote_code)
    return LoadedModel(model, load_processor(path, trust_remote_code=trust_remote_code), saved_dtype, compute)
