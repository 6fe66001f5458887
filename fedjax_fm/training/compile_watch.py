"""Counts XLA compilations, so that a recompilation inside the rounds loop is seen.

Every batch has a static shape, so after the first round nothing should compile
again; a compilation there means a shape, dtype or static argument changed (a bug
that silently costs seconds per round). JAX reports each backend compilation as a
``jax.monitoring`` duration event; this listener counts them with the compiled
function's name.
"""

from __future__ import annotations

from typing import Any

from jax import monitoring

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileWatch:
    """``with CompileWatch() as watch: ...`` then ``watch.count`` / ``watch.names``."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def _listener(self, event: str, duration_secs: float, **kwargs: Any) -> None:
        if event == _BACKEND_COMPILE_EVENT:
            self.names.append(str(kwargs.get("fun_name", "?")))

    @property
    def count(self) -> int:
        return len(self.names)

    def __enter__(self) -> "CompileWatch":
        monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc: Any) -> None:
        monitoring.unregister_event_duration_listener(self._listener)
