"""The named colours of the procedural library and a nearest-named-colour classifier.

The RGB values are chosen to be far apart in CIELAB (smallest pairwise CIE76 distance ~37, between
white and gray), so that a colour can be recovered from a shaded render by nearest neighbour. White is
an off-white (0.92) and black a dark gray (0.12): both still show shading against a white background.
"""
import functools
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

RGB = Tuple[float, float, float]

NAMED_COLOURS: Dict[str, RGB] = {
    "red": (0.85, 0.10, 0.10),
    "orange": (1.00, 0.50, 0.05),
    "yellow": (0.98, 0.86, 0.10),
    "green": (0.15, 0.62, 0.20),
    "blue": (0.10, 0.35, 0.95),
    "purple": (0.58, 0.18, 0.68),
    "pink": (1.00, 0.55, 0.75),
    "white": (0.92, 0.92, 0.92),
    "black": (0.12, 0.12, 0.12),
    "brown": (0.50, 0.30, 0.12),
    "gray": (0.52, 0.52, 0.52),
    "cyan": (0.10, 0.80, 0.85),
}
COLOUR_NAMES = tuple(NAMED_COLOURS)


@functools.lru_cache(maxsize=1)
def colour_lab() -> np.ndarray:
    """CIELAB (D65) of the named colours, (12, 3), in COLOUR_NAMES order."""
    from skimage.color import rgb2lab

    return rgb2lab(np.array([NAMED_COLOURS[name] for name in COLOUR_NAMES])[None])[0]


def nearest_colour_name(
    rgb: Union[Sequence[float], np.ndarray, torch.Tensor],
    lightness_weight: float = 1.0,
    palette: Optional[Dict[str, Sequence[float]]] = None,
) -> str:
    """The name of the colour nearest (CIELAB, CIE76) to one RGB colour in [0, 1]: among the named
    colours, or among ``palette`` (name -> RGB in [0, 1]) when given.

    ``lightness_weight`` < 1 discounts the L axis, which makes the choice more robust to shading.
    """
    from skimage.color import rgb2lab

    if isinstance(rgb, torch.Tensor):
        rgb = rgb.detach().cpu().numpy()
    lab = rgb2lab(np.clip(np.asarray(rgb, dtype=np.float64).reshape(1, 1, 3), 0.0, 1.0))[0, 0]
    if palette is None:
        names, table = COLOUR_NAMES, colour_lab()
    else:
        names = tuple(palette)
        colours = np.stack([np.asarray(palette[name], dtype=np.float64).reshape(3) for name in names])
        table = rgb2lab(np.clip(colours, 0.0, 1.0)[None])[0]
    weights = np.array([lightness_weight, 1.0, 1.0])
    distances = np.linalg.norm((table - lab) * weights, axis=-1)
    return names[int(distances.argmin())]
