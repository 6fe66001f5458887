"""Whether the Hugging Face Hub can be used, decided once and quickly, before any download.

Without this a run that names a hub model on a machine with no network retries
every request for about a minute (huggingface_hub's back-off), printing each retry,
before failing with a message that does not say what to do. Here:

* ``HF_HUB_OFFLINE`` (any of 1/true/yes/on) means offline, as huggingface_hub defines it;
* otherwise the Hub's host name is resolved once per process, with a short timeout:
  a machine that cannot resolve it cannot download from it.

When offline, a model that is in the local Hugging Face cache is still usable:
:func:`use_hub` switches huggingface_hub and transformers to offline mode, so they
read the cache without a single network attempt.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import socket
from typing import Optional

HUB_HOST = "huggingface.co"
RESOLVE_TIMEOUT_S = 3.0
_TRUE = {"1", "true", "yes", "on"}


@functools.lru_cache(maxsize=1)
def hub_offline_reason() -> Optional[str]:
    """Why the Hub cannot be used here, or None when it may be."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return "HF_HUB_OFFLINE is set"
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(socket.getaddrinfo, HUB_HOST, 443)
    try:
        future.result(timeout=RESOLVE_TIMEOUT_S)
        return None
    except concurrent.futures.TimeoutError:
        return f"{HUB_HOST} did not resolve within {RESOLVE_TIMEOUT_S:.0f} s (no network?)"
    except OSError as error:
        return f"{HUB_HOST} does not resolve ({error.strerror or error}): no network"
    finally:
        pool.shutdown(wait=False)


def is_cached(repo_id: str, filename: str = "config.json") -> bool:
    """Whether ``filename`` of ``repo_id`` is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename), str)


def go_offline() -> None:
    """Puts huggingface_hub and transformers in offline mode for this process (cache only)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as constants

        constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - a dependency
        pass


def use_hub(repo_id: str, filename: str = "config.json") -> Optional[str]:
    """Prepares to load ``repo_id`` from the Hub: None if it can be loaded (online, or offline
    with a cached copy, in which case offline mode is switched on), else why it cannot."""
    reason = hub_offline_reason()
    if reason is None:
        return None
    if is_cached(repo_id, filename):
        go_offline()
        return None
    return reason
