"""What every renderer shares."""
from dataclasses import dataclass

from torch import nn


@dataclass
class RenderedParts:
    """The modules a renderer draws (geometry, material, background), held outside its module tree:
    the system owns them, so their parameters and checkpoints are the system's, not the renderer's."""

    geometry: nn.Module
    material: nn.Module
    background: nn.Module
