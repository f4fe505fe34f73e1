"""Load a checkpoint's multimodal processor, also where torchvision is missing or broken.

In transformers 5.x every processor whose constructor takes a ``video_processor`` (LLaVA-OneVision,
Qwen2-VL, Qwen2.5-VL, Qwen3-VL, SmolVLM) cannot be built or loaded without torchvision, because
the video processors need it. Such a processor is loaded through a subclass of its own class that
does not declare the video sub-processor: tokenizer, image processor, chat template and token
bookkeeping stay the model's own. For a family that takes video (its record names a video
processor kind) the torch-only twin of its video processor (:mod:`.video_processors`), built from
the checkpoint's own video settings, is then attached as ``video_processor``, so clips still work;
the saved processor keeps those settings under the original class name. Image processors fall
back to their PIL backend when the default one cannot run.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import transformers
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, ProcessorMixin

from ..errors import CalibrationError, one_line
from .families import family_for
from .video_processors import VIDEO_PROCESSORS, TorchVideoProcessor

#: Files in which transformers records the processor class, in AutoProcessor's lookup order.
_CLASS_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "tokenizer_config.json",
)
_VIDEO = "video"
_NO_PROCESSOR = (
    "no processor found in {path}: save the model's processor (processor_config.json or "
    "preprocessor_config.json, tokenizer files) next to its weights"
)


def torchvision_usable() -> bool:
    """Whether transformers considers torchvision installed (it may still fail to import)."""
    from transformers.utils import is_torchvision_available

    return bool(is_torchvision_available())


def _attributes(cls: type) -> list[str]:
    """Sub-processor attribute names of a processor class (``get_attributes`` or legacy ``attributes``)."""
    if hasattr(cls, "get_attributes"):
        return list(cls.get_attributes())
    return list(getattr(cls, "attributes", []))


class _VideoFreeInit(ProcessorMixin):
    """Sits just before ProcessorMixin in a video-free subclass's MRO and drops video sub-processors.

    Family constructors pass ``video_processor`` to ``ProcessorMixin.__init__`` positionally or by
    keyword; this maps positional arguments to the full attribute list and removes video ones.
    """

    _all_attributes: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(self._all_attributes):
            raise TypeError(f"{type(self).__name__} takes at most {len(self._all_attributes)} sub-processors.")
        named = dict(zip(self._all_attributes, args))
        overlap = named.keys() & kwargs.keys()
        if overlap:
            raise TypeError(f"Got multiple values for argument {sorted(overlap)[0]}.")
        named.update(kwargs)
        ProcessorMixin.__init__(self, **{k: v for k, v in named.items() if _VIDEO not in k})


def _to_dict_keeping_video(self: ProcessorMixin) -> dict[str, Any]:
    """The processor's settings, with those of an attached torch-only video processor under the
    class name it stands for (so that a loader with torchvision rebuilds the original)."""
    data = ProcessorMixin.to_dict(self)
    video = self.__dict__.get("video_processor")
    if isinstance(video, TorchVideoProcessor):
        data["video_processor"] = video.to_dict()
    return data


_VIDEO_FREE: dict[type, type] = {}


def _arguments_in_init_order(cls: type[ProcessorMixin], kept: list[str]) -> Any:
    """A ``_get_arguments_from_pretrained`` returning the video-free sub-processors where
    ``cls.__init__`` takes them positionally, None in its video parameters: ``from_pretrained``
    passes them positionally, and a constructor whose first parameter is ``video_processor``
    (LLaVA-NeXT-Video) would otherwise receive the image processor there."""
    every = set(_attributes(cls))
    order = [name for name in inspect.signature(cls.__init__).parameters if name in every]

    def arguments(sub: type, *args: Any, **kwargs: Any) -> list[Any]:
        found = super(sub, sub)._get_arguments_from_pretrained(*args, **kwargs)
        loaded = dict(zip(kept, found))
        if not loaded or not set(loaded) <= set(order):  # a constructor taking them otherwise: as they come
            return found
        last = max(order.index(name) for name in loaded)
        return [loaded.get(name) for name in order[:last + 1]]

    return classmethod(arguments)


def without_video(cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """A subclass of processor class ``cls`` without its video sub-processor(s).

    Same name as ``cls`` so saved processors keep the original ``processor_class``. Returns ``cls``
    itself when it has no video sub-processor.
    """
    if cls in _VIDEO_FREE:
        return _VIDEO_FREE[cls]
    every = _attributes(cls)
    kept = [name for name in every if _VIDEO not in name]
    if len(kept) == len(every):
        return cls
    namespace: dict[str, Any] = {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": f"{cls.__name__} without video sub-processors (loaded without torchvision).",
        "_all_attributes": tuple(every),
        "get_attributes": classmethod(lambda _cls: list(kept)),
        "to_dict": _to_dict_keeping_video,
        "_get_arguments_from_pretrained": _arguments_in_init_order(cls, kept),
    }
    if isinstance(getattr(cls, "attributes", None), list):  # older ProcessorMixin: class-level list
        namespace["attributes"] = list(kept)
    subclass = type(cls.__name__, (cls, _VideoFreeInit), namespace)
    _VIDEO_FREE[cls] = subclass
    return subclass


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _declared_class(folder: Path) -> tuple[str | None, str | None]:
    """The processor class name and remote-code reference recorded in the checkpoint, if any."""
    for name in _CLASS_FILES:
        data = _read_json(folder / name)
        auto_map = data.get("auto_map") if isinstance(data.get("auto_map"), dict) else {}
        remote = auto_map.get("AutoProcessor")
        if data.get("processor_class") or remote:
            return data.get("processor_class"), remote
    from transformers.models.auto import processing_auto

    by_model_type = getattr(processing_auto, "PROCESSOR_MAPPING_NAMES", {})
    return by_model_type.get(_read_json(folder / "config.json").get("model_type")), None


def _resolve_class(folder: Path, trust_remote_code: bool) -> type[ProcessorMixin] | None:
    """The processor class the checkpoint names: a transformers class, or its own remote code."""
    name, remote = _declared_class(folder)
    if remote and trust_remote_code:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(remote, str(folder), local_files_only=True)
    found = getattr(transformers, name, None) if name else None
    return found if isinstance(found, type) and issubclass(found, ProcessorMixin) else None


def _video_settings(folder: Path) -> dict[str, Any]:
    """The checkpoint's video processor settings: ``processor_config.json``'s ``video_processor``,
    else ``video_preprocessor_config.json``, else (as AutoVideoProcessor falls back) the image
    processor's settings."""
    nested = _read_json(folder / "processor_config.json")
    for settings in (nested.get("video_processor"), _read_json(folder / "video_preprocessor_config.json"),
                     nested.get("image_processor"), _read_json(folder / "preprocessor_config.json")):
        if isinstance(settings, dict) and settings:
            return settings
    return {}


def torch_video_processor(folder: Path) -> TorchVideoProcessor | None:
    """The torch-only video processor of the checkpoint in ``folder`` (its family's kind, its
    settings), or None when its family takes no video."""
    family = family_for(str(_read_json(folder / "config.json").get("model_type")))
    if family is None or family.video_processor is None:
        return None
    if family.video_processor not in VIDEO_PROCESSORS:
        raise CalibrationError(f"family '{family.name}' names the video processor kind '{family.video_processor}', "
                               f"which is not one of {', '.join(VIDEO_PROCESSORS)}: add its class to "
                               "atv_prune.model.video_processors.VIDEO_PROCESSORS, or install torchvision")
    return VIDEO_PROCESSORS[family.video_processor](_video_settings(folder))


def _with_video(processor: ProcessorMixin, folder: Path) -> ProcessorMixin:
    """Attach the torch-only video processor to a processor loaded without its own."""
    if getattr(processor, "video_processor", None) is None and hasattr(processor, "video_token"):
        video = torch_video_processor(folder)
        if video is not None:
            processor.video_processor = video
    return processor


def _image_processor_runs(image_processor: Any) -> bool:
    """Whether the image processor can process a small RGB image here (dummy or torchvision-less fails)."""
    try:
        image_processor(images=[Image.new("RGB", (64, 48), (128, 96, 64))], return_tensors="pt")
    except Exception:
        return False
    return True


def _pil_image_processor(folder: Path, current: Any) -> Any | None:
    """A PIL-backed twin of ``current``: its ``*Pil`` class built from the same settings, else the
    checkpoint's image processor loaded with the PIL backend (``backend`` kwarg, or legacy ``use_fast``)."""
    base = type(current).__name__.removesuffix("Fast")
    pil_class = getattr(transformers, base if base.endswith("Pil") else f"{base}Pil", None)
    if isinstance(pil_class, type):
        try:
            return pil_class.from_dict(current.to_dict())
        except Exception:
            pass
    for kwargs in ({"backend": "pil"}, {"use_fast": False}):
        try:
            return AutoImageProcessor.from_pretrained(str(folder), local_files_only=True, **kwargs)
        except Exception:
            continue
    return None


def _with_working_image_processor(processor: Any, folder: Path) -> ProcessorMixin:
    """Check the processor is multimodal and its image processor runs; switch to PIL if needed."""
    if not isinstance(processor, ProcessorMixin):
        raise CalibrationError(
            f"{folder} holds only a {type(processor).__name__}, not a multimodal processor: "
            "save the model's processor next to its weights"
        )
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        raise CalibrationError(
            f"the {type(processor).__name__} in {folder} has no image processor: "
            "use a vision-language checkpoint whose processor handles images"
        )
    if _image_processor_runs(image_processor):
        return processor
    fallback = _pil_image_processor(folder, image_processor)
    if fallback is None or not _image_processor_runs(fallback):
        raise CalibrationError(
            f"the image processor {type(image_processor).__name__} in {folder} cannot run here and has no "
            f"working PIL variant in transformers {transformers.__version__}: install a torchvision "
            "matching torch, or another transformers version"
        )
    processor.image_processor = fallback
    return processor


def load_processor(path: str | Path, trust_remote_code: bool = False) -> ProcessorMixin:
    """Load the processor saved in a local checkpoint folder, with AutoProcessor semantics.

    Tries ``AutoProcessor`` unless torchvision is missing and the class has a video sub-processor;
    then (or if that fails) loads the checkpoint's own class without its video sub-processor.
    Always ends with an image processor that runs. Raises :class:`CalibrationError`.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CalibrationError(f"no model folder at {folder}: pass the local checkpoint folder")
    if not any((folder / name).is_file() for name in (*_CLASS_FILES, "tokenizer.json")):
        raise CalibrationError(_NO_PROCESSOR.format(path=folder))
    try:
        cls = _resolve_class(folder, trust_remote_code)
    except Exception as exc:
        raise CalibrationError(f"cannot resolve the processor class of {folder}: {one_line(exc)}") from exc
    video_free = without_video(cls) if cls is not None else None

    if video_free is None or video_free is cls or torchvision_usable():
        try:
            processor = AutoProcessor.from_pretrained(
                str(folder), trust_remote_code=trust_remote_code, local_files_only=True
            )
        except Exception as exc:
            if video_free is None or video_free is cls:
                raise CalibrationError(f"cannot load the processor in {folder}: {one_line(exc)}") from exc
        else:
            return _with_working_image_processor(processor, folder)
    try:
        processor = video_free.from_pretrained(
            str(folder), trust_remote_code=trust_remote_code, local_files_only=True
        )
    except Exception as exc:
        raise CalibrationError(
            f"cannot load the {cls.__name__} processor in {folder}: {one_line(exc)}"
        ) from exc
    return _with_video(_with_working_image_processor(processor, folder), folder)
