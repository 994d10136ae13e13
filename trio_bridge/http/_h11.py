"""h11 for the two hot HTTP paths (the broker's public server, the connector's upstream calls),
compiled where a wheel exists.

``h11-mypyc`` is h11 built with mypyc: the same API and behaviour, published with compiled
wheels for CPython on Linux, macOS and Windows and a pure-Python wheel everywhere else.
Measured with callgrind (bench/instructions.py, c=10 small requests): 4.33 → 3.79 million
instructions per request for both roles together (−12.5 %). ``TRIO_BRIDGE_PURE_H11=1`` (or a
missing ``h11_mypyc``) selects plain h11; CI runs the HTTP tests both ways.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING or os.environ.get("TRIO_BRIDGE_PURE_H11"):
    import h11
else:
    try:
        import h11_mypyc as h11
    except ImportError:  # pragma: no cover - h11-mypyc is a dependency
        import h11

__all__ = ["h11"]
