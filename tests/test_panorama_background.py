"""panorama-environment-map: the panorama behind the object in val/test, the plain colour in training."""
import numpy as np
import pytest
import torch

import threestudio_mv
from threestudio_mv.utils.errors import UserError
from threestudio_mv.utils.io import save_image


def background(**cfg):
    return threestudio_mv.find("panorama-environment-map")(cfg)


def test_directions_read_the_panorama_where_the_panorama_cli_puts_them(tmp_path):
    height, width = 16, 32
    image = np.zeros((height, width, 3), dtype=np.float32)
    image[..., 0] = (np.arange(width) + 0.5) / width  # red = column
    image[..., 1] = ((np.arange(height) + 0.5) / height)[:, None]  # green = row
    save_image(tmp_path / "pano.png", image)
    env = background(image=str(tmp_path / "pano.png")).eval()
    dirs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]])
    colour = env(dirs.view(1, 4, 1, 3)).view(4, 3)
    assert colour[0, 0] == pytest.approx(0.5, abs=0.04)  # azimuth 0 (front, +x): the middle column
    assert colour[1, 0] == pytest.approx(0.25, abs=0.04)  # azimuth 90 (+y): a quarter to the left
    assert colour[2, 1] < 0.1 and colour[0, 1] == pytest.approx(0.5, abs=0.04)  # up: top row; horizon: middle
    assert colour[3, 0] == pytest.approx(0.5, abs=0.05)  # azimuth 180: the seam, blended across it
    env.train()
    assert torch.equal(env(dirs), torch.ones(4, 3))  # training renders keep the guidance model's white


def test_a_generated_room_and_bad_settings(tmp_path):
    env = background(prompt="a room with blue walls, a brown floor and a white ceiling", steps=2, height=32).eval()
    assert env.panorama.shape == (3, 32, 64) and 0.0 <= float(env.panorama.min()) and float(env.panorama.max()) <= 1.0
    with pytest.raises(UserError, match="exactly one"):
        background()
    with pytest.raises(UserError, match="system.background.image.*not found"):
        background(image=str(tmp_path / "missing.png"))
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(UserError, match="cannot read"):
        background(image=str(tmp_path / "bad.png"))
