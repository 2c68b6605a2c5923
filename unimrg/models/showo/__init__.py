"""Show-o adapter package; the registry imports ``unimrg.models.showo:Showo``."""

from unimrg.models.showo.adapter import Showo, ShowoConfig

__all__ = ["Showo", "ShowoConfig"]
