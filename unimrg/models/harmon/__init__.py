"""Harmon adapter package; the registry imports ``unimrg.models.harmon:Harmon``."""

from unimrg.models.harmon.adapter import Harmon, HarmonConfig

__all__ = ["Harmon", "HarmonConfig"]
