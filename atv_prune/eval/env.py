"""The pinned lmms-eval, the versions recorded with every result, and offline mode.

lmms-eval is optional (``pip install --no-deps lmms-eval==0.7.3`` plus the few requirements in
:data:`INSTALL_HINT`): nothing outside ``atv_prune.eval`` imports it, and everything here fails
with one line naming the fix when it is missing or another version is installed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from importlib import metadata

from ..errors import AtvPruneError
from ..versions import package_versions

#: The one lmms-eval release this bridge is written and tested against.
LMMS_EVAL_VERSION = "0.7.3"

INSTALL_HINT = (
    f"pip install --no-deps lmms-eval=={LMMS_EVAL_VERSION} && "
    "pip install loguru sacrebleu evaluate pytz tenacity openpyxl (not a plain "
    "'pip install lmms-eval': it replaces the CPU torch with a CUDA build)"
)

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def require_lmms_eval() -> str:
    """Check that the pinned lmms-eval is installed and importable; return its version."""
    try:
        version = metadata.version("lmms-eval")
    except metadata.PackageNotFoundError:
        raise AtvPruneError(f"lmms-eval is not installed: {INSTALL_HINT}") from None
    if version != LMMS_EVAL_VERSION:
        raise AtvPruneError(
            f"lmms-eval {version} is installed but atv_prune's bridge is pinned to {LMMS_EVAL_VERSION}: "
            f"{INSTALL_HINT}"
        )
    try:
        import lmms_eval.evaluator  # noqa: F401
    except ImportError as error:
        raise AtvPruneError(f"lmms-eval {version} cannot be imported ({error}): {INSTALL_HINT}") from None
    return version


def versions() -> dict[str, str]:
    """Versions that decide a score: the package versions record plus lmms-eval and datasets
    (from package metadata: lmms-eval reports "unknown@unknown" for a pip install)."""
    return package_versions(extra=("lmms-eval", "datasets"))


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Run the enclosed code with the Hugging Face Hub and datasets offline, then restore.

    huggingface_hub and datasets read ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` once, at import,
    and transformers has imported them long before an evaluation starts; setting the variables
    alone would leave every hub dataset lookup retrying a network that is not there (~25 s per
    try, and lmms-eval tries five times). So the already-read flags are switched too.
    """
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved_env = {name: os.environ.get(name) for name in _OFFLINE_VARS}
    flags = ((hub_constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
             (datasets.config, "HF_DATASETS_OFFLINE"))
    saved_flags = [getattr(module, name) for module, name in flags]
    try:
        for name in _OFFLINE_VARS:
            os.environ[name] = "1"
        for module, name in flags:
            setattr(module, name, True)
        yield
    finally:
        for (module, name), value in zip(flags, saved_flags):
            setattr(module, name, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Leave lmms-eval's and datasets' own progress bars on, or switch them off for the enclosed
    code (``--quiet``), then restore. lmms-eval 0.7.3 creates its bars with tqdm imported into
    ``lmms_eval.evaluator`` and ``lmms_eval.api.task``, the first with an explicit ``disable``,
    so those names are swapped for a silent tqdm."""
    if enabled:
        yield
        return
    import datasets
    import lmms_eval.api.task
    import lmms_eval.evaluator
    from tqdm import tqdm

    def silent(*args: object, **kwargs: object) -> tqdm:
        return tqdm(*args, **{**kwargs, "disable": True})

    modules = (lmms_eval.evaluator, lmms_eval.api.task)
    saved = [module.tqdm for module in modules]
    datasets_were_quiet = not datasets.is_progress_bar_enabled()
    try:
        for module in modules:
            module.tqdm = silent
        datasets.disable_progress_bars()
        yield
    finally:
        for module, original in zip(modules, saved):
            module.tqdm = original
        if not datasets_were_quiet:
            datasets.enable_progress_bars()
