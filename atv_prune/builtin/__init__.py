"""The built-in benchmark, tokenizer, processor and trainer for a small LLaVA trained from scratch.

No pretrained VLM or benchmark can be downloaded where this project runs, so ``scenes`` renders a
deterministic benchmark of shape scenes with question families that mirror the paper's nine
benchmarks, ``tokenizer`` builds a closed-vocabulary tokenizer and a real ``LlavaProcessor``, and
``train`` trains a ``LlavaForConditionalGeneration`` on it on a CPU.
"""

from pathlib import Path

#: Where the shipped trained model and the shipped benchmark (test split, calibration captions) live.
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
BENCHMARK_DIR = Path(__file__).resolve().parent / "benchmark"

#: The shipped video benchmark (``clips``: test split of four video tasks, calibration clips), for
#: users' own video models; the shipped model is an image model.
VIDEO_BENCHMARK_DIR = Path(__file__).resolve().parent / "video_benchmark"

#: ``clips.generate_video_benchmark`` arguments that rebuild the shipped video benchmark.
SHIPPED_VIDEO_BENCHMARK_ARGS = dict(seed=0, n_test=40, n_calib=32)

#: ``scenes.generate_benchmark`` arguments of each generation's benchmark as shipped: the test split
#: and the calibration captions (plus an empty ``val/`` and ``train.jsonl``, which are not shipped).
BENCHMARK_ARGS = {
    1: dict(seed=0, n_train=0, n_val=0, n_test=100, n_calib=256),
    2: dict(seed=0, n_train=0, n_val=0, n_test=100, n_calib=256, generation=2),
}
#: The arguments that rebuild the benchmark shipped in ``BENCHMARK_DIR``.
SHIPPED_BENCHMARK_ARGS = BENCHMARK_ARGS[1]


def default_benchmark() -> Path | None:
    """The shipped benchmark folder, when its test split is there (the commands' default ``--bench``)."""
    return BENCHMARK_DIR if (BENCHMARK_DIR / "test").is_dir() else None
