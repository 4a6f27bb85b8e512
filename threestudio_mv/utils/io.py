"""Saving results: atomic file writes, PNG images and grids, MP4 videos, JSON."""
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, List, Sequence, Union

import numpy as np
import torch

PathLike = Union[str, os.PathLike]
ImageLike = Union[np.ndarray, torch.Tensor]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    So an interrupted write never leaves a truncated checkpoint, image or mesh behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it replaces ``path`` (an existing folder too, with as
    short a gap as possible) only if the block succeeds, so a model folder is never half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700 folders
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def to_uint8(image: ImageLike) -> np.ndarray:
    """Float in [0, 1] (H, W, C) or (H, W) array/tensor -> uint8; uint8 passes through."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_image(path: PathLike, image: ImageLike) -> Path:
    """Save an (H, W), (H, W, 3) or (H, W, 4) image (float [0,1] or uint8) as PNG, atomically."""
    from PIL import Image

    array = to_uint8(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return Path(path)


def image_grid(rows: Sequence[Sequence[ImageLike]], pad: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """Tile images (each (H, W, C), same size) into one float grid with ``pad`` pixels between."""
    arrays = [[to_uint8(image).astype(np.float32) / 255.0 for image in row] for row in rows]
    height, width, channels = arrays[0][0].shape
    n_rows, n_cols = len(arrays), max(len(row) for row in arrays)
    grid = np.full(
        (n_rows * height + (n_rows - 1) * pad, n_cols * width + (n_cols - 1) * pad, channels),
        pad_value,
        dtype=np.float32,
    )
    for r, row in enumerate(arrays):
        for c, image in enumerate(row):
            y, x = r * (height + pad), c * (width + pad)
            grid[y : y + height, x : x + width] = image
    return grid


def save_video(path: PathLike, frames: List[ImageLike], fps: int = 30) -> Path:
    """Save frames (H, W, 3) as an H.264 MP4 (imageio-ffmpeg), atomically."""
    import imageio.v2 as imageio

    with atomic_path(path) as tmp:
        writer = imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", quality=8, macro_block_size=1)
        for frame in frames:
            writer.append_data(to_uint8(frame)[..., :3])
        writer.close()
    return Path(path)


def save_json(path: PathLike, data: object) -> Path:
    """Write JSON (indented) atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return Path(path)


def load_image(path: PathLike) -> np.ndarray:
    """Load an image as float32 in [0, 1], (H, W, C) with C = 3 or 4."""
    from PIL import Image

    with Image.open(path) as image:
        mode = "RGBA" if image.mode in ("RGBA", "LA", "P") else "RGB"
        return np.asarray(image.convert(mode), dtype=np.float32) / 255.0
