"""Foreground masks and re-framing of object images: one place for every image-conditioned tool
(MVDreamBooth's subject images, image-to-3D's inputs).

An RGBA image's alpha is its mask; an RGB image on a plain background is masked here (the background
colour is the median of the border pixels). :func:`frame_image` crops to the object and re-frames it
so that it fills a given share of a square frame, as in the multi-view training renders.
"""
import math
from pathlib import Path
from typing import List, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from threestudio_mv.utils.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BORDER_WIDTH = 2  # pixels of the image border that estimate a plain background
PLAIN_BORDER_FRACTION = 0.9  # this share of border pixels must match the background colour


def uncomposite(rgb: Tensor, alpha: Tensor, background: Sequence[float]) -> Tensor:
    """Colours (N, 3, H, W) composited over ``background`` with coverage ``alpha`` (N, 1, H, W) -> the
    straight (un-composited) colour where alpha > 1/255, clamped to [0, 1]; the input elsewhere. An
    anti-aliased edge pixel then carries the object's colour, not its mix with the background."""
    back = torch.tensor(background, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    straight = ((rgb - back * (1.0 - alpha)) / alpha.clamp_min(1e-3)).clamp(0.0, 1.0)
    return torch.where(alpha > 1.0 / 255.0, straight, rgb)


def colour_palette(straight: Tensor, alpha: Tensor, min_alpha: float = 0.9, levels: int = 64) -> Tensor:
    """The distinct colours (K, 3) of the pixels of ``straight`` (N, 3, H, W) (un-composited colours)
    that ``alpha`` (N, 1, H, W) covers at least ``min_alpha``, quantised to ``levels`` per channel
    (a few hundred colours for an object image, so that matching against them stays cheap)."""
    pixels = straight.permute(0, 2, 3, 1)[alpha[:, 0] >= min_alpha].clamp(0.0, 1.0)
    return torch.unique((pixels * (levels - 1)).round(), dim=0) / (levels - 1)


def match_palette(rgb: Tensor, alpha: Tensor, palette: Tensor, background: Sequence[float]) -> Tensor:
    """Colours (N, 3, H, W) composited over ``background`` with coverage ``alpha`` (N, 1, H, W): each
    covered pixel's straight colour becomes its nearest ``palette`` colour (K, 3) (RGB distance), then
    is composited again at its coverage; uncovered pixels and an empty palette leave ``rgb`` as is."""
    covered = alpha[:, 0] > 1.0 / 255.0
    if palette.numel() == 0 or not bool(covered.any()):
        return rgb
    straight = uncomposite(rgb, alpha, background).permute(0, 2, 3, 1)
    pixels = straight[covered]
    nearest = torch.cat([palette[torch.cdist(chunk, palette.to(chunk)).argmin(dim=1)] for chunk in pixels.split(4096)])
    straight = straight.clone()
    straight[covered] = nearest.to(straight)
    back = torch.tensor(background, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return torch.where(covered[:, None], straight.permute(0, 3, 1, 2) * alpha + back * (1.0 - alpha), rgb)


def match_palette_by_mask(rgb: Tensor, foreground: Tensor, palette: Tensor, background: Sequence[float]) -> Tensor:
    """:func:`match_palette` for images whose coverage is unknown, only a ``foreground`` mask (N, 1, H,
    W) bool: a pixel whose 8 neighbours are foreground too takes its nearest ``palette`` colour; a
    foreground pixel on the object's edge, which may be partly background, takes the nearest blend of
    a palette colour with the background (the nearest point on the segments from the background to
    each palette colour). Other pixels and an empty palette leave ``rgb`` as is."""
    if palette.numel() == 0 or not bool(foreground.any()):
        return rgb
    interior = -F.max_pool2d(-foreground.float(), 3, stride=1, padding=1) > 0.5
    matched = match_palette(rgb, interior.to(rgb), palette, background)
    edge = (foreground & ~interior)[:, 0]
    pixels = rgb.permute(0, 2, 3, 1)[edge]
    if pixels.numel():
        back = torch.tensor(background, dtype=rgb.dtype, device=rgb.device)
        away = palette.to(rgb) - back  # (K, 3)
        cover = (((pixels[:, None] - back) * away).sum(-1) / (away * away).sum(-1).clamp_min(1e-6)).clamp(0.0, 1.0)  # (P, K)
        blends = back + cover[..., None] * away  # (P, K, 3)
        best = (blends - pixels[:, None]).norm(dim=-1).argmin(dim=1)
        out = matched.permute(0, 2, 3, 1).clone()
        out[edge] = blends[torch.arange(len(best)), best]
        matched = out.permute(0, 3, 1, 2)
    return matched


def border_pixels(rgb: np.ndarray, width: int = BORDER_WIDTH) -> np.ndarray:
    """The pixels (K, 3) of an (H, W, 3) image's outer ``width``-pixel ring."""
    mask = np.zeros(rgb.shape[:2], dtype=bool)
    mask[:width], mask[-width:], mask[:, :width], mask[:, -width:] = True, True, True, True
    return rgb[mask]


def mask_plain_background(rgb: np.ndarray, threshold: float, name: str = "image") -> np.ndarray:
    """Foreground mask (H, W) bool of an RGB image in [0, 1] on a plain background.

    The background colour is the median of the border pixels; a pixel is foreground when some channel
    differs from it by more than ``threshold``. Specks and pinholes smaller than 0.1% of the image
    are cleaned up (scikit-image). A border that is not one colour raises a UserError naming ``name``.
    """
    from skimage.morphology import remove_small_holes, remove_small_objects

    border = border_pixels(rgb)
    colour = np.median(border, axis=0)
    plain = (np.abs(border - colour).max(axis=-1) <= threshold).mean()
    if plain < PLAIN_BORDER_FRACTION:
        raise UserError(
            f"{name}: its border is not one plain colour (only {plain:.0%} of it matches), so the object "
            "cannot be masked; give RGBA PNGs or photos on a plain background"
        )
    foreground = np.abs(rgb - colour).max(axis=-1) > threshold
    small = max(1, int(0.001 * foreground.size))
    foreground = remove_small_objects(foreground, max_size=small)
    return remove_small_holes(foreground, max_size=small)


# ------------------------------------------------------------------------------------------ images
def read_rgba(path: Path, threshold: float) -> np.ndarray:
    """An image file as straight RGBA float32 (H, W, 4); RGB images are masked (plain background)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
            array = np.asarray(image.convert("RGBA" if has_alpha else "RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UserError(f"cannot read image '{path}' ({error})") from None
    if has_alpha:
        if array[..., 3].min() > 0.99:  # an alpha channel that masks nothing: treat as RGB
            array = array[..., :3]
        else:
            return array
    mask = mask_plain_background(array, threshold, str(path))
    return np.concatenate([array, mask[..., None].astype(np.float32)], axis=-1)


def frame_image(rgba: np.ndarray, size: int, recenter: bool, object_fraction: float) -> Tensor:
    """RGBA (H, W, 4) -> (size, size, 4): padded to a square (or, with ``recenter``, cropped to the
    object and padded so its larger side is ``object_fraction`` of the frame), then resized with
    antialiasing on premultiplied colour."""
    alpha = rgba[..., 3]
    height, width = alpha.shape
    if recenter and (alpha > 0.5).any():
        rows, cols = np.nonzero(alpha > 0.5)
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        side = int(math.ceil(max(bottom - top, right - left) / object_fraction))
        centre_row, centre_col = (top + bottom) / 2.0, (left + right) / 2.0
    else:
        side = max(height, width)
        centre_row, centre_col = height / 2.0, width / 2.0
    canvas = np.zeros((side, side, 4), dtype=np.float32)
    row0, col0 = int(round(centre_row - side / 2.0)), int(round(centre_col - side / 2.0))
    src_r0, src_c0 = max(0, row0), max(0, col0)
    src_r1, src_c1 = min(height, row0 + side), min(width, col0 + side)
    canvas[src_r0 - row0 : src_r1 - row0, src_c0 - col0 : src_c1 - col0] = rgba[src_r0:src_r1, src_c0:src_c1]
    premultiplied = torch.from_numpy(np.concatenate([canvas[..., :3] * canvas[..., 3:], canvas[..., 3:]], axis=-1))
    if side != size:
        premultiplied = F.interpolate(
            premultiplied.permute(2, 0, 1)[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )[0].permute(1, 2, 0).clamp(0.0, 1.0)
    return premultiplied


def folder_images(folder: Path, label: str) -> List[Path]:
    """The images of a folder (sorted; hidden files and a transforms.json aside). A file of another
    kind among them is a UserError naming it: a stray file in a photo folder is a mistake, not a
    photo to skip silently. An empty list when the folder holds no file at all."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != "transforms.json")
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    strays = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if images and strays:
        raise UserError(
            f"{label} '{folder}': '{strays[0]}' is not an image ({', '.join(IMAGE_SUFFIXES)}); "
            "move it out of the folder, which should hold only the images"
        )
    return images


def image_paths(inputs: Sequence[Union[str, Path]], label: str = "input") -> List[Path]:
    """The image files named by ``inputs``: files as given, folders expanded to their images (sorted).
    A UserError (naming ``label`` and the path) for a missing path or a folder without images."""
    paths: List[Path] = []
    for given in inputs:
        path = Path(given).expanduser()
        if not path.exists():
            raise UserError(f"{label} '{given}' does not exist")
        if path.is_dir():
            found = folder_images(path, label)
            if not found:
                raise UserError(f"{label} '{given}' is a folder with no images ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        else:
            paths.append(path)
    if not paths:
        raise UserError(f"no {label} given")
    return paths


def load_object_image(path: Path, size: int, object_fraction: float, threshold: float = 0.1) -> Tensor:
    """One object image (RGBA, or RGB on a plain background) masked, re-centred and re-framed so the
    object's larger side fills ``object_fraction`` of a ``size``-pixel square: premultiplied RGBA
    (size, size, 4). A UserError names the file when it cannot be read or shows no object."""
    rgba = read_rgba(path, threshold)
    coverage = float((rgba[..., 3] > 0.5).mean())
    if coverage < 1e-3:
        raise UserError(f"{path}: no object found (the mask is empty); give an RGBA PNG or the object on a plain background")
    if coverage > 0.98:
        raise UserError(f"{path}: the object mask covers the whole image; give an RGBA PNG or the object on a plain background")
    return frame_image(rgba, size, True, object_fraction)
