"""OpenUni adapter package; the registry imports ``unimrg.models.openuni:OpenUni``."""

from unimrg.models.openuni.adapter import OpenUni, OpenUniConfig

__all__ = ["OpenUni", "OpenUniConfig"]
