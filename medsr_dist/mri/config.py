"""The MRI knobs: :class:`medsr_dist.config.MriConfig`, mounted in the one config tree as ``mri:``.

Re-exported here for the MRI modules; ``medsr mri`` command-line options override ``cfg.mri`` keys.
"""
from __future__ import annotations

from medsr_dist.config import MriConfig

__all__ = ["MriConfig"]
