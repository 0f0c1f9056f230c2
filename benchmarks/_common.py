"""What the benchmark scripts share. They run as ``python benchmarks/NAME.py`` from the repository
root, so this module is imported as ``_common``; importing it puts the checkout first on ``sys.path``
(the ``sft_plugins`` measured is the checkout's, as in the arms' child processes)."""

from __future__ import annotations

import platform
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def versions(dists: Iterable[str]) -> dict[str, str | None]:
    """Python's version, then each distribution's installed version (None where it is not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
