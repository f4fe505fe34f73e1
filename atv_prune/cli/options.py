"""The command-line options every command shares, defined once with one default each.

``shared("model", "calib", ...)`` decorates a command with those options in order. Choices that
come from a registry (methods, pools) are :class:`RegistryChoice`: read when an option is parsed
or its help is shown, so a family, pool or method registered from outside appears in every
command, and listing them imports no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from ..algorithms.specs import MAX_SEED

#: Calibration samples drawn by every command (the paper's 128 ShareGPT4V pairs).
DEFAULT_SAMPLES = 128
#: Frames drawn from a calibration video (VideoSampling's default, kept here so --help imports no numpy).
DEFAULT_MAX_FRAMES = 8
#: Documents per generate call in every evaluation.
DEFAULT_BATCH_SIZE = 16


class RegistryChoice(click.Choice):
    """A ``click.Choice`` whose choices are read from a registry each time they are needed."""

    def __init__(self, names: Callable[[], Sequence[str]]) -> None:
        self._names = names
        super().__init__([])

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self._names())

    @choices.setter
    def choices(self, value: Sequence[str]) -> None:
        """click's constructor assigns the static list; the registry is the source instead."""


def method_names() -> tuple[str, ...]:
    from ..algorithms.specs import METHODS

    return METHODS.names()


def pool_names() -> tuple[str, ...]:
    from ..algorithms.specs import POOLS

    return POOLS.names()


def calibrated_mask_method_names() -> tuple[str, ...]:
    """Calibrated methods that prune to a sparsity or N:M target (what `sweep` and `iou` compare);
    structured methods remove whole heads and channels instead, so they are not offered."""
    from ..algorithms.specs import METHODS

    return tuple(name for name, method in METHODS.items() if method.needs_calibration and not method.structured)


_PATH = click.Path(path_type=Path)

OPTIONS: dict[str, Callable[[], Callable[[Any], Any]]] = {
    "model": lambda: click.option("--model", "model_path", required=True, type=_PATH,
                                  help="Local checkpoint folder."),
    "calib": lambda: click.option("--calib", "calib_path", required=True, type=_PATH,
                                  help="Calibration file: conversation JSON or image-text JSONL."),
    "samples": lambda: click.option("--samples", type=click.IntRange(min=1), default=DEFAULT_SAMPLES,
                                    show_default=True, help="Calibration samples drawn."),
    "seed": lambda: click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
                                 help="Seed of the calibration draw and of random pools."),
    "device": lambda: click.option("--device", default=None,
                                   help="Compute device [default: cuda if available, else cpu]."),
    "dtype": lambda: click.option("--dtype", default="auto", show_default=True,
                                  help="Compute dtype: auto (float32 on CPU, checkpoint dtype on GPU), float32, "
                                       "bfloat16, float16."),
    "image-root": lambda: click.option("--image-root", type=_PATH, default=None,
                                       help="Folder image paths are relative to [default: the calibration "
                                            "file's folder]."),
    "max-pixels": lambda: click.option("--max-pixels", type=int, default=None,
                                       help="Downscale calibration images to at most this many pixels."),
    "max-frames": lambda: click.option("--max-frames", type=click.IntRange(min=2), default=DEFAULT_MAX_FRAMES,
                                       show_default=True,
                                       help="Frames drawn from each video (calibration clips, video tasks), "
                                            "evenly over the clip."),
    "fps": lambda: click.option("--fps", type=click.FloatRange(min=0, min_open=True), default=None,
                                help="Draw this many frames per second of each video (still at most "
                                     "--max-frames) [default: --max-frames over the whole clip]."),
    "max-length": lambda: click.option("--max-length", type=click.IntRange(min=1), default=None,
                                       help="Truncate calibration samples to at most this many tokens (from the "
                                            "end of their text) [default: the model's context, "
                                            "max_position_embeddings]."),
    "out": lambda: click.option("--out", "out_dir", required=True, type=_PATH,
                                help="Output folder (must not exist unless --overwrite)."),
    "overwrite": lambda: click.option("--overwrite", is_flag=True, help="Replace an existing --out."),
    "trust-remote-code": lambda: click.option("--trust-remote-code", is_flag=True,
                                              help="Allow custom model code shipped with the checkpoint."),
    "quiet": lambda: click.option("--quiet", is_flag=True, help="No progress bars."),
    "load": lambda: click.option("--load", type=click.Choice(["auto", "memory", "stream"]), default="auto",
                                 show_default=True,
                                 help="memory: load the whole model; stream: load the non-block weights and read "
                                      "each decoder block from the checkpoint when its turn comes, then write it out "
                                      "and free it (for models larger than host memory); auto: stream when the "
                                      "model would need more than 80% of the available memory."),
    "max-shard-size": lambda: click.option("--max-shard-size", default=None,
                                           help="Largest output weight file, e.g. 5GB [default: transformers' for a "
                                                "model in memory, two decoder blocks when streamed]."),
    "activation-memory": lambda: click.option("--activation-memory", default=None,
                                              help="Calibration activations kept in memory, e.g. 8GB; beyond it they "
                                                   "spill to memory-mapped files [default: half the memory available "
                                                   "when the capture starts]."),
    "spill-dir": lambda: click.option("--spill-dir", type=_PATH, default=None,
                                      help="Folder for spilled activations [default: inside the output folder]."),
    "tasks": lambda: click.option("--tasks", multiple=True, required=True,
                                  help="Built-in task names (exist, count, ...) or lmms-eval task ids (gqa, pope, "
                                       "mme, ...), e.g. --tasks exist count pope."),
    "bench": lambda: click.option("--bench", "bench_dir", type=_PATH, default=None,
                                  help="Benchmark folder with test/<task>.jsonl [default: the shipped one]."),
    "limit": lambda: click.option("--limit", type=click.IntRange(min=1), default=None,
                                  help="Evaluate the first N documents of each task."),
    "batch-size": lambda: click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULT_BATCH_SIZE,
                                       show_default=True,
                                       help="Documents per generate call (batch size > 1 can change some scores "
                                            "slightly)."),
    "study-out": lambda: click.option("--out", "out_dir", required=True, type=_PATH,
                                      help="Study folder; re-running the same study there resumes it."),
    "study-overwrite": lambda: click.option("--overwrite", is_flag=True, help="Discard the cells already in --out."),
    # Models larger than one device, at evaluation (accelerate's big-model inference).
    "device-map": lambda: click.option("--device-map", type=click.Choice(["auto"]), default=None,
                                       help="Spread the evaluated model over the GPUs, then the CPU, then disk "
                                            "(for models larger than one GPU)."),
    "max-memory": lambda: click.option("--max-memory", default=None,
                                       help="With --device-map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB "
                                            "[default: what each has free]."),
    "offload-folder": lambda: click.option("--offload-folder", type=_PATH, default=None,
                                           help="With --device-map: where weights that fit nowhere go, and a "
                                                "streamed study's pruned checkpoints [default: a temporary folder]."),
    # Studies on a Ray cluster.
    "ray": lambda: click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None,
                                metavar="[ADDRESS]",
                                help="Run the cells as Ray tasks: alone, on a local cluster started for this "
                                     "command; 'auto' or an address (host:6379, ray://host:10001): on that cluster."),
    "cpus-per-cell": lambda: click.option("--cpus-per-cell", type=click.FloatRange(min=0, min_open=True), default=1.0,
                                          show_default=True, help="With --ray: CPUs each cell holds."),
    "gpus-per-cell": lambda: click.option("--gpus-per-cell", type=click.FloatRange(min=0), default=None,
                                          help="With --ray: GPUs each cell holds [default: 1 when the cells run on "
                                               "CUDA, else 0]."),
    "retries": lambda: click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True,
                                    help="With --ray: how often a cell whose worker died is run again before it "
                                         "is recorded as failed."),
}

#: How a study's cells are placed on a Ray cluster (``--ray`` and its resources).
CLUSTER_OPTIONS = ("ray", "cpus-per-cell", "gpus-per-cell", "retries")
#: How an evaluated model is spread over devices (``--device-map`` and its limits).
PLACEMENT_OPTIONS = ("device-map", "max-memory", "offload-folder")
#: The options of every study command (compare, sweep, motprobe sensitivity).
STUDY_OPTIONS = ("model", "calib", "tasks", "bench", "limit", "batch-size", "samples", "seed", "device", "dtype",
                 "load", *PLACEMENT_OPTIONS, "image-root", "max-pixels", "max-frames", "fps", "max-length",
                 "study-out", "study-overwrite", "trust-remote-code", "quiet", *CLUSTER_OPTIONS)


def shared(*names: str) -> Callable[[Any], Any]:
    """Decorate a command with the named shared options, in the order given."""

    def decorate(function: Any) -> Any:
        for name in reversed(names):
            function = OPTIONS[name]()(function)
        return function

    return decorate


def study_options(function: Any) -> Any:
    """The options every study command shares (model, data, tasks, evaluation, output)."""
    return shared(*STUDY_OPTIONS)(function)
