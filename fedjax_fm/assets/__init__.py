"""Model files shipped inside the package (package data).

``demo_base/``: the offline demo's base model, a small T5 v1.1 pretrained by this
project with span corruption on its own generated corpus (see its ``LICENSE.md`` and
``scripts/pretrain_demo_base.py``, which regenerates it). A config names it
``model.name: demo-base``; :func:`resolve_model_name` turns that into its directory.
"""

from __future__ import annotations

from pathlib import Path

DEMO_BASE_NAME = "demo-base"
DEMO_BASE_DIR = Path(__file__).resolve().parent / "demo_base"

# name in a config -> directory inside the package
SHIPPED_MODELS = {DEMO_BASE_NAME: DEMO_BASE_DIR}


def resolve_model_name(name: str) -> str:
    """The directory of a shipped model (``demo-base``), else ``name`` unchanged."""
    path = SHIPPED_MODELS.get(name)
    return str(path) if path is not None else name


__all__ = ["DEMO_BASE_DIR", "DEMO_BASE_NAME", "SHIPPED_MODELS", "resolve_model_name"]
