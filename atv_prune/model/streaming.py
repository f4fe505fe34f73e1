"""Decoder blocks streamed from the checkpoint, for models larger than host memory.

:func:`load_streamed` loads everything but the decoder blocks (vision tower, projector,
embeddings, norms, LM head) with transformers' own ``from_pretrained``, the blocks left in the
checkpoint through its ``device_map`` disk offload: transformers maps each block weight to its
place in the safetensors shards (renamed keys of older checkpoints included), accelerate's hooks
are then taken off. :class:`StreamedBlocks` is the walk's :class:`~.walk.BlockHome`: a block's
tensors are read from the shards onto the compute device when its turn comes; after the turn the
pruned block is written to a scratch file and freed. :meth:`StreamedBlocks.attached_for_saving`
points the model's offload hooks at those files, so that ``save_pretrained`` writes the output
shards (one at a time) exactly as it writes any offloaded model.

Peak host memory: the non-block weights, one block (two while the pruned block is converted to
the saved dtype), the calibration activations, and at save time one output shard.
"""

from __future__ import annotations

import ctypes
import logging
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import AtvPruneError, UnsupportedModelError, one_line
from .checkpoint import check_checkpoint
from .layout import ModelLayout, resolve
from .loading import read_config, saved_dtype_of

#: Name of the work folder (inside the output's staging folder): pruned blocks until they are saved,
#: and any block weights transformers must convert (rewrite) before they can be read.
WORKDIR = ".streaming"


@dataclass(frozen=True)
class StoredTensor:
    """Where one weight of the model lives in a safetensors file, and the dtype it is used in."""

    file: str
    key: str
    dtype: torch.dtype


def block_device_map(model: nn.Module, blocks: nn.ModuleList) -> dict[str, str]:
    """A transformers ``device_map``: every decoder block on "disk" (left in the checkpoint),
    everything else on "cpu" (whole subtrees where they hold no block)."""
    block_ids = {id(block) for block in blocks}
    placement: dict[str, str] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            if id(child) in block_ids:
                placement[prefix + name] = "disk"
            elif any(id(sub) in block_ids for sub in child.modules()):
                visit(child, f"{prefix}{name}.")
            else:
                placement[prefix + name] = "cpu"
        for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            placement[prefix + name] = "cpu"

    visit(model, "")
    return placement


def stored_shapes(entries: Mapping[str, StoredTensor]) -> dict[str, tuple[int, ...]]:
    """The shape of every entry as its file's header records it (no tensor data is read)."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = defaultdict(list)
    for name, entry in entries.items():
        by_file[entry.file].append(name)
    shapes = {}
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as handle:
            for name in names:
                shapes[name] = tuple(handle.get_slice(entries[name].key).get_shape())
    return shapes


def check_block_weights(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                        checkpoint: Path) -> None:
    """Compare the decoder-block weights the model expects (names and shapes, from its meta
    skeleton) with those the checkpoint's shards hold (from their headers): any weight missing,
    left over or of another shape is one line naming it."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(name for name in set(expected) & set(found) if tuple(expected[name]) != tuple(found[name]))
    if missing:
        raise AtvPruneError(f"{checkpoint} lacks {len(missing)} decoder-block weights the model needs (e.g. "
                            f"{missing[0]}): the checkpoint is incomplete or of another architecture")
    if unexpected:
        raise AtvPruneError(f"{checkpoint} holds {len(unexpected)} decoder-block weights the model does not have "
                            f"(e.g. {unexpected[0]}): the checkpoint is of another architecture")
    if mismatched:
        name = mismatched[0]
        raise AtvPruneError(f"{checkpoint}: {name} has shape {list(found[name])} in the checkpoint but the model "
                            f"needs {list(expected[name])} ({len(mismatched)} such weights): the checkpoint does not "
                            "match its config.json")


def read_tensors(entries: Mapping[str, StoredTensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Read the entries from their safetensors files onto ``device`` (each file opened once), in
    their dtype."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = defaultdict(list)
    for name, entry in entries.items():
        by_file[entry.file].append(name)
    tensors = {}
    target = "cpu" if device.type == "cpu" else str(device)
    for file, names in by_file.items():
        with safe_open(file, framework="pt", device=target) as handle:
            for name in names:
                tensors[name] = handle.get_tensor(entries[name].key).to(entries[name].dtype)
    return tensors


def release_free_memory() -> None:
    """Give the C allocator's free pages back to the system (glibc's ``malloc_trim``): blocks of
    tensors freed one after another otherwise leave the heap fragmented, and the resident memory
    of a streamed run would grow block by block (about 0.6 GB over 24 blocks in the benchmark)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer ``name`` (relative to ``root``)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=owner._parameters[leaf].requires_grad)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        raise KeyError(name)


def _get_tensor(root: nn.Module, name: str) -> torch.Tensor:
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    return owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]


class PrunedWeights(Mapping):
    """The pruned block weights, read back from their scratch files as ``save_pretrained`` asks
    for them; a file is deleted once all its tensors have been read."""

    def __init__(self, entries: dict[str, StoredTensor]) -> None:
        self.entries = entries
        self._unread = Counter(entry.file for entry in entries.values())

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        tensor = read_tensors({name: entry}, torch.device("cpu"))[name]
        self._unread[entry.file] -= 1
        if not self._unread[entry.file]:
            Path(entry.file).unlink(missing_ok=True)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


class StreamedBlocks:
    """The walk's block home for a streamed model: each block read from the checkpoint onto the
    compute device for its turn, then written to a file in ``scratch`` in ``saved_dtype`` (for
    saving) and freed."""

    def __init__(self, block_path: str, entries: dict[str, StoredTensor], saved_dtype: torch.dtype,
                 scratch: Path) -> None:
        self.block_path = block_path
        self.entries = entries
        self.saved_dtype = saved_dtype
        self.scratch = scratch
        self.pruned: dict[str, StoredTensor] = {}
        self.bytes_read = 0
        self.seconds = {"read_blocks": 0.0, "write_blocks": 0.0}

    def _prefix(self, index: int) -> str:
        return f"{self.block_path}.{index}."

    def _names(self, index: int) -> list[str]:
        prefix = self._prefix(index)
        return [name for name in self.entries if name.startswith(prefix)]

    def enter(self, index: int, block: nn.Module, device: torch.device) -> None:
        start = time.perf_counter()
        prefix = self._prefix(index)
        tensors = read_tensors({name: self.entries[name] for name in self._names(index)}, device)
        for name, tensor in tensors.items():
            _set_tensor(block, name[len(prefix):], tensor)
            self.bytes_read += tensor.numel() * tensor.element_size()
        self.seconds["read_blocks"] += time.perf_counter() - start

    def leave(self, index: int, block: nn.Module, finished: bool) -> None:
        from safetensors.torch import save_file

        start = time.perf_counter()
        prefix = self._prefix(index)
        names = self._names(index)
        if finished:
            self.scratch.mkdir(parents=True, exist_ok=True)
            file = self.scratch / f"block-{index:05d}.safetensors"
            save_file({name: _get_tensor(block, name[len(prefix):]).detach().to("cpu", self.saved_dtype).contiguous()
                       for name in names}, str(file))
            self.pruned.update({name: StoredTensor(str(file), name, self.saved_dtype) for name in names})
        for name in names:
            local = name[len(prefix):]
            _set_tensor(block, local, _get_tensor(block, local).detach().to("meta"))
        release_free_memory()
        self.seconds["write_blocks"] += time.perf_counter() - start

    @contextmanager
    def attached_for_saving(self, model: nn.Module, blocks: nn.ModuleList) -> Iterator[None]:
        """Offload hooks on every block pointing at the pruned weights, for ``save_pretrained``
        (which reads an offloaded model's weights through them, one output shard at a time)."""
        from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module
        from accelerate.utils import PrefixedDataset

        missing = [name for name in self.entries if name not in self.pruned]
        if missing:
            raise RuntimeError(f"{len(missing)} block weights were never pruned (e.g. {missing[0]})")
        weights = PrunedWeights(self.pruned)
        for index, block in enumerate(blocks):
            add_hook_to_module(block, AlignDevicesHook(execution_device="cpu", offload=True, place_submodules=True,
                                                       weights_map=PrefixedDataset(weights, self._prefix(index))))
        try:
            yield
        finally:
            for block in blocks:
                remove_hook_from_module(block, recurse=True)


@contextmanager
def _quiet_offload_messages() -> Iterator[None]:
    """accelerate's notes that offloaded weights sit on the meta device, and that a device-map
    entry names a parameter (a model's own, such as LLaVA-NeXT's ``image_newline``) rather than a
    module, describe what we asked for."""
    logger = logging.getLogger("accelerate.big_modeling")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The following device_map keys do not match any submodules")
            yield
    finally:
        logger.setLevel(level)


def _offload_entries(model: nn.Module) -> dict[str, StoredTensor]:
    """The disk-offload index transformers built for the blocks (weight name -> file, key, dtype),
    read from the accelerate hooks ``from_pretrained`` attached."""
    from accelerate.utils import PrefixedDataset

    for module in model.modules():
        weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if isinstance(weights, PrefixedDataset):
            index = getattr(weights.dataset, "index", {})
            return {name: StoredTensor(info["safetensors_file"], info.get("weight_name", name),
                                       getattr(torch, info["dtype"]))
                    for name, info in index.items() if info.get("safetensors_file")}
    return {}


def expected_block_weights(blocks: nn.ModuleList, block_path: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight (parameters and persistent buffers) of the decoder blocks."""
    return {f"{block_path}.{index}.{name}": tuple(tensor.shape)
            for index, block in enumerate(blocks) for name, tensor in block.state_dict(keep_vars=True).items()}


@dataclass
class StreamedModel:
    """A checkpoint opened for streaming: the model with its non-block weights loaded (on the CPU,
    in the compute dtype) and its decoder blocks on the meta device, its layout, the blocks' home,
    and the dtype its weights were saved in."""

    model: nn.Module
    layout: ModelLayout
    home: StreamedBlocks
    saved_dtype: torch.dtype


def load_streamed(path: str | Path, workdir: Path, *, dtype: torch.dtype | str = torch.float32,
                  trust_remote_code: bool = False) -> StreamedModel:
    """Open the checkpoint in ``path`` for streaming, computing in ``dtype`` (as
    :func:`~.loading.load_model`); pruned blocks and any block weights transformers has to rewrite
    go to ``workdir`` (the caller removes it)."""
    from safetensors import SafetensorError

    path = Path(path)
    try:
        return _open_streamed(path, dtype, trust_remote_code, workdir)
    except SafetensorError as error:
        raise AtvPruneError(f"cannot read the weights in {path}: {one_line(error)}; the checkpoint is damaged or "
                            "its model.safetensors.index.json does not match its files") from None


def _open_streamed(path: Path, dtype: torch.dtype | str, trust_remote_code: bool, workdir: Path) -> StreamedModel:
    from accelerate.hooks import remove_hook_from_module
    from transformers import AutoModelForImageTextToText

    from .loading import model_skeleton

    config = read_config(path, trust_remote_code)
    skeleton = model_skeleton(path, trust_remote_code)
    if skeleton is None:
        raise UnsupportedModelError(f"the model in {path} cannot be built on the meta device, so its blocks cannot "
                                    "be streamed: use --load memory")
    check_checkpoint(path, skeleton)
    layout = resolve(skeleton)
    device_map = block_device_map(skeleton, layout.blocks(skeleton))
    try:
        with _quiet_offload_messages():
            model = AutoModelForImageTextToText.from_pretrained(
                path, dtype=dtype, device_map=device_map, use_safetensors=True, trust_remote_code=trust_remote_code,
                offload_folder=str(workdir / "converted"))
    except ValueError as error:
        raise UnsupportedModelError(f"cannot stream the decoder blocks of {path}: transformers cannot leave them in "
                                    f"the checkpoint ({one_line(error, 200)}); use --load memory") from None
    except OSError as error:
        raise AtvPruneError(f"cannot load weights from {path}: {str(error).splitlines()[0]}") from None
    entries = _offload_entries(model)
    blocks = layout.blocks(model)
    expected = expected_block_weights(blocks, layout.block_path)
    # before the hooks come off: taking them off restores weights transformers initialised itself
    check_block_weights(expected, stored_shapes({n: e for n, e in entries.items() if n in expected}), path)
    remove_hook_from_module(model, recurse=True)
    saved_dtype = saved_dtype_of(config, model)
    home = StreamedBlocks(layout.block_path, {n: e for n, e in entries.items() if n in expected}, saved_dtype,
                          workdir / "pruned")
    return StreamedModel(model.eval(), layout, home, saved_dtype)


def model_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of every parameter and buffer of ``model`` (a meta skeleton too), in ``dtype`` when given."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        size = torch.empty((), dtype=dtype).element_size() if dtype is not None and tensor.is_floating_point() \
            else tensor.element_size()
        total += tensor.numel() * size
    return total


def block_bytes(blocks: nn.ModuleList, dtype: torch.dtype) -> int:
    """Bytes of one decoder block (the largest) in ``dtype``."""
    return max(model_bytes(block, dtype) for block in blocks)
