"""The names of per-exit metrics (`loss/exit_12`, `accuracy/exit_12`, ...), read back.

`soft.exit_metrics` writes them; logs, tables and plots read them here, without importing JAX
(the sweep's own process only reads JSON).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_EXIT_KEY = re.compile(r"^(loss|accuracy)/exit_(\d+)$")  # as `soft.exit_metrics` writes them


def exit_values(metrics: Mapping[str, Any], kind: str = "loss") -> dict[int, float]:
    """{exit: value} from `loss/exit_N` (or `accuracy/exit_N`) keys."""
    out = {}
    for key, value in metrics.items():
        m = _EXIT_KEY.match(key)
        if m and m.group(1) == kind:
            out[int(m.group(2))] = float(value)
    return dict(sorted(out.items()))
