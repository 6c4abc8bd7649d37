"""Progress bars the caller can switch off (and that stay silent when output is not a terminal)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def progress(total: int, desc: str, unit: str = "it", unit_scale: bool = False, enabled: bool = True):
    disable = not enabled or bool(os.environ.get("CODECLLM_QUIET")) or not sys.stderr.isatty()
    with tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, disable=disable,
              leave=False, dynamic_ncols=True) as bar:
        yield bar
