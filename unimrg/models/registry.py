"""``--model NAME`` → adapter class. Adding a UMM is one module plus one line here.

Imports are lazy so that ``--dry-run`` and the launcher do not pay for transformers / diffusers.
"""

from __future__ import annotations

import importlib

from unimrg.models.base import ModelConfig, UMMAdapter

_ADAPTERS = {
    "harmon": "unimrg.models.harmon:Harmon",
    "janus": "unimrg.models.janus:Janus",
    "openuni": "unimrg.models.openuni:OpenUni",
    "showo": "unimrg.models.showo:Showo",
}


def names() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_class(name: str) -> type[UMMAdapter]:
    if name not in _ADAPTERS:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(names())} (unimrg/models/registry.py)")
    module, cls = _ADAPTERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def config_class(name: str) -> type[ModelConfig]:
    """The adapter's ``*Config`` dataclass (a subclass of ``ModelConfig``)."""
    return adapter_class(name).config_class


def build_model(cfg: ModelConfig) -> UMMAdapter:
    """Build the adapter (random init at ``cfg.size``), load its official weights if any weight field
    (``official_sources``: ``cfg.checkpoint`` and e.g. Show-o's ``magvit_checkpoint``) is set, freeze."""
    model = adapter_class(cfg.name)(cfg)
    if model.has_official_weights():
        model.load_official(cfg.checkpoint)
    model.apply_freezing()
    return model
