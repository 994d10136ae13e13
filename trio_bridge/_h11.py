"""h11, compiled when available: ``h11-mypyc`` is h11 built with mypyc (same API, its own
import name). Installed (``pip install 'trio-bridge[fast]'``), the public server and the
transport to the LLM use it; without it, pure-Python h11. Both are tested."""

from __future__ import annotations

try:
    import h11_mypyc as h11  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # pragma: no cover - the pure-Python fallback
    import h11

COMPILED = h11.__name__ == "h11_mypyc"

__all__ = ["COMPILED", "h11"]
