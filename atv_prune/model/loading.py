"""Loading a local checkpoint: devices, dtypes, the model and its processor, in one place.

Safetensors only, remote code off unless asked for. :func:`load_model_and_processor` is what every
command and study uses; :func:`model_skeleton` builds the architecture on the meta device for the
checks that need shapes but no weights. Loading is strict (:mod:`.checkpoint`): no weight of a
loaded model comes from random initialisation. A model too large for one device is spread over the
GPUs, the CPU and disk by accelerate's big-model inference (:class:`Placement`): at load time
(:func:`load_model_and_processor`), or for a model already in memory (:func:`dispatch`).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AtvPruneError, ConfigError, UnsupportedModelError
from .checkpoint import check_checkpoint, loading_problems
from .families import supported_families

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def silence_loading_bars() -> None:
    """Switch off transformers' weight-loading progress bars (``--quiet``)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


#: Device types a run can compute on or keep activations on, each with its availability check.
ACCELERATORS = ("cuda", "mps", "xpu")


def parse_device(name: str) -> torch.device:
    """A device name checked for its form (cpu, cuda, cuda:N) but not for being here: a cell that
    runs on a cluster worker finds its device there."""
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}': use cpu, cuda or cuda:N") from None


def resolve_device(name: str | None) -> torch.device:
    """The compute device: the one asked for, else CUDA when present, else the CPU. A device this
    torch build or machine does not have (``mps`` on Linux, ``cuda:3`` on a one-GPU machine) or
    one that holds no data (``meta``) is a one-line :class:`ConfigError`."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = parse_device(name)
    if device.type == "cpu":
        return device
    build = f"this torch build ({torch.__version__})"
    if device.type == "meta":
        raise ConfigError(f"device '{name}' holds shapes but no data, so a model cannot run on it: use cpu or cuda")
    if device.type not in ACCELERATORS:
        raise ConfigError(f"device type '{device.type}' is not supported (atv-prune runs on cpu, "
                          f"{', '.join(ACCELERATORS)}): use cpu or cuda")
    backend = getattr(torch, device.type, None) if device.type != "mps" else getattr(torch.backends, "mps", None)
    if backend is None or not backend.is_available():
        fallback = "cuda" if torch.cuda.is_available() else "cpu"
        raise ConfigError(f"device '{name}' asked for but {build} or this machine has no {device.type.upper()} "
                          f"device: use --device {fallback}")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ConfigError(f"device '{name}' asked for but this machine has {count} {device.type.upper()} "
                          f"device{'s' if count != 1 else ''} (0-{count - 1}): use --device {device.type}:0")
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
    return _skeleton(Path(path), read_config(path, trust_remote_code), trust_remote_code)


def _skeleton(path: Path, config: Any, trust_remote_code: bool) -> nn.Module | None:
    from transformers import AutoModelForImageTextToText

    try:
        with torch.device("meta"):
            return AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as error:
        raise _not_image_text_to_text(path, config, error) from None
    except Exception:  # noqa: BLE001 - any other construction failure: leave the checks to the run
        return None


#: The device-map strategies accepted (accelerate's: fill the GPUs, then the CPU, then disk).
DEVICE_MAPS = ("auto",)


@dataclass(frozen=True)
class Placement:
    """How a model that does not fit on one device is spread for inference (accelerate's
    big-model inference): ``device_map`` is the strategy, ``max_memory`` caps each device
    (``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}``; None: what each has free), and the weights
    beyond those caps go to disk, in a temporary folder under ``offload_folder`` (None: the
    system's temporary folder) removed with the model."""

    device_map: str = "auto"
    max_memory: dict[int | str, str | int] | None = None
    offload_folder: Path | None = None

    def __post_init__(self) -> None:
        if self.device_map not in DEVICE_MAPS:
            raise ConfigError(f"unknown device map '{self.device_map}': choose {', '.join(DEVICE_MAPS)}")

    @classmethod
    def on(cls, device: torch.device, offload_folder: Path | None = None) -> Placement:
        """Big-model placement kept to one compute device: ``device`` (one GPU, or none for the
        CPU) as far as it has room, then host memory, then disk, as accelerate sizes them."""
        from accelerate.utils import get_max_memory

        keep = {device.index or 0} if device.type == "cuda" else set()
        limits = {name: size for name, size in get_max_memory().items() if name in keep or name == "cpu"}
        return cls(max_memory=limits, offload_folder=offload_folder)

    def scratch_folder(self) -> str:
        """A new folder for offloaded weights (remove it with the model: :func:`_remove_with`)."""
        if self.offload_folder is not None:
            self.offload_folder.mkdir(parents=True, exist_ok=True)
        return tempfile.mkdtemp(prefix="atv-offload-", dir=self.offload_folder)


def _remove_with(owner: object, folder: str) -> None:
    """Remove ``folder`` when ``owner`` is garbage-collected (or when the interpreter exits)."""
    weakref.finalize(owner, shutil.rmtree, folder, True)


def parse_max_memory(text: str) -> dict[int | str, str]:
    """``--max-memory 0=70GiB,1=70GiB,cpu=200GiB`` as accelerate's ``max_memory`` mapping (GPU
    indices as ints); each size is checked by accelerate's own parser."""
    from accelerate.utils import convert_file_size_to_int

    usage = "give DEVICE=SIZE[,DEVICE=SIZE...] with DEVICE a GPU index, cpu or mps, e.g. 0=70GiB,1=70GiB,cpu=200GiB"
    limits: dict[int | str, str] = {}
    for item in text.replace(" ", "").split(","):
        device, _, size = item.partition("=")
        if not device or not size or not (device.isdigit() or device in ("cpu", "mps")):
            raise ConfigError(f"--max-memory '{text}': '{item}' is not DEVICE=SIZE: {usage}")
        try:
            convert_file_size_to_int(size)
        except ValueError:
            raise ConfigError(f"--max-memory '{text}': '{size}' is not a size (e.g. 70GiB, 500MB): {usage}") from None
        limits[int(device) if device.isdigit() else device] = size
    return limits


def main_device(device_map: dict[str, Any]) -> torch.device:
    """Where a dispatched model takes its inputs: its first accelerator, else the CPU (the rule
    accelerate's ``dispatch_model`` uses for its main device)."""
    for device in device_map.values():
        if device not in ("cpu", "disk"):
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return torch.device("cpu")


def dispatch(model: nn.Module, placement: Placement) -> torch.device:
    """Spread a model already in memory (e.g. just pruned) over the devices as ``placement``
    says, as ``from_pretrained(device_map=...)`` would; returns the device its inputs go to."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    max_memory = get_balanced_memory(model, max_memory=placement.max_memory, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    offload = placement.scratch_folder() if "disk" in device_map.values() else None
    if offload is not None:
        _remove_with(model, offload)
    dispatch_model(model, device_map=device_map, offload_dir=offload)
    return main_device(device_map)


def _from_pretrained(path: Path, config: Any, dtype: torch.dtype | str, trust_remote_code: bool,
                     spread: dict[str, Any]) -> nn.Module:
    """``from_pretrained`` with transformers' loading info checked: weights missing, unexpected or
    misshapen are a :class:`CheckpointError`."""
    from transformers import AutoModelForImageTextToText

    try:
        model, info = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True,
            output_loading_info=True, ignore_mismatched_sizes=True, **spread,
        )
    except ValueError as error:
        raise _not_image_text_to_text(path, config, error) from None
    except OSError as error:
        raise AtvPruneError(f"cannot load weights from {path}: {str(error).splitlines()[0]}") from None
    loading_problems(info).raise_if_any(path)
    return model


def load_model(
    path: str | Path, dtype: torch.dtype | str = torch.float32, trust_remote_code: bool = False,
    placement: Placement | None = None,
) -> tuple[nn.Module, torch.dtype]:
    """Load an image-text-to-text model from a local folder onto the CPU (or spread as
    ``placement`` says), in eval mode, strictly: damaged weight files, and weights missing,
    unexpected or of the wrong shape for the config, are a one-line :class:`CheckpointError`
    (checked from the headers before loading, and from transformers' loading info after), never
    random values in the model.

    Returns the model and the dtype its checkpoint was saved in (to save the result alike).
    """
    path = Path(path)
    config = read_config(path, trust_remote_code)
    check_checkpoint(path, _skeleton(path, config, trust_remote_code))
    if placement is None:
        model = _from_pretrained(path, config, dtype, trust_remote_code, {})
    else:
        folder = placement.scratch_folder()
        try:
            model = _from_pretrained(path, config, dtype, trust_remote_code, {
                "device_map": placement.device_map, "max_memory": placement.max_memory, "offload_folder": folder})
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        _remove_with(model, folder)
    return model.eval(), saved_dtype_of(config, model)


def config_dtype(config: Any, fallback: torch.dtype) -> torch.dtype:
    """The dtype a checkpoint's config says its weights were saved in, else ``fallback``."""
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return saved if isinstance(saved, torch.dtype) else DTYPES.get(str(saved), fallback)


def saved_dtype_of(config: Any, model: nn.Module) -> torch.dtype:
    """The dtype the checkpoint's weights were saved in (its config's), else the model's."""
    return config_dtype(config, next(model.parameters()).dtype)


def round_through(model: nn.Module, dtype: torch.dtype) -> None:
    """Round the model's floating weights and buffers through ``dtype`` in place, each keeping its
    own dtype: a model pruned in a wider compute dtype then holds exactly what its checkpoint, saved
    in ``dtype``, would hold (so what is evaluated in memory is what ``prune`` writes)."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point() and tensor.dtype != dtype and tensor.device.type != "meta":
                tensor.copy_(tensor.to(dtype))


@dataclass
class LoadedModel:
    """A checkpoint loaded for a run: the model (on the CPU, or spread by a placement; in eval
    mode), its processor, the dtype its weights were saved in (to save a result alike) and the
    run's compute device (with a placement: where the model takes its inputs)."""

    model: nn.Module
    processor: Any
    saved_dtype: torch.dtype
    device: torch.device


def load_model_and_processor(path: str | Path, *, dtype: str = "auto", device: str | None = None,
                             trust_remote_code: bool = False, placement: Placement | None = None) -> LoadedModel:
    """The model and processor of a local checkpoint, in the compute dtype for ``device``
    (``dtype="auto"``: fp32 on the CPU, the checkpoint's own dtype on a GPU). The model stays on
    the CPU (the engine moves one block at a time, an evaluation moves it whole), unless a
    ``placement`` spreads it over the GPUs, the CPU and disk as it loads (for an evaluation of a
    model larger than one device)."""
    from .processors import load_processor

    compute = resolve_device(device)
    model, saved_dtype = load_model(path, compute_dtype(dtype, compute), trust_remote_code, placement)
    if placement is not None:
        compute = main_device(getattr(model, "hf_device_map", None) or {"": "cpu"})
    return LoadedModel(model, load_processor(path, trust_remote_code=trust_remote_code), saved_dtype, compute)
