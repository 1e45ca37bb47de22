"""Named flow architectures: each a function ``name(input_dim, **kw) -> Flow``.

``context_dim=`` makes an architecture conditional where that makes sense.
"""

from __future__ import annotations

__all__: list[str] = []
