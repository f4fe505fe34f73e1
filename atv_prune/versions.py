"""The one record of package versions every output carries (reports, studies, evaluations)."""

from __future__ import annotations

import platform
from collections.abc import Iterable
from importlib import metadata

#: Packages that decide a pruning result.
CORE_PACKAGES: tuple[str, ...] = ("atv-prune", "torch", "transformers", "accelerate", "safetensors", "numpy",
                                  "pillow")


def package_versions(extra: Iterable[str] = ()) -> dict[str, str]:
    """Python's version and each package's installed version ("not installed" when absent):
    :data:`CORE_PACKAGES`, then ``extra`` (e.g. ``lmms-eval`` for an evaluation)."""
    versions = {"python": platform.python_version()}
    for name in (*CORE_PACKAGES, *extra):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
