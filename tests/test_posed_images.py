"""posed-images-datamodule: reads a tiny analytic-sphere folder written here, and rejects bad folders."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import threestudio_mv
from threestudio_mv.data.posed_images import PosedImagesDataModule
from threestudio_mv.utils.camera import c2w_from_spherical, camera_ray_directions, get_rays
from threestudio_mv.utils.errors import UserError
from threestudio_mv.utils.io import save_image

RADIUS = 0.6
SIZE = 32
FOVY = 40.0
ELEVATIONS = [10.0, 20.0, 30.0, 20.0, 10.0, 30.0]
AZIMUTHS = [0.0, 60.0, 120.0, 180.0, -120.0, -60.0]
DISTANCE = 2.5


def trace_sphere(rays_o: torch.Tensor, rays_d: torch.Tensor) -> tuple:
    """Hit mask and colour (0.5 + 0.5 * normal) of rays against the sphere of RADIUS at the origin."""
    b = (rays_o * rays_d).sum(-1)
    c = (rays_o * rays_o).sum(-1) - RADIUS**2
    disc = b * b - c
    hit = disc > 0
    t = -b - disc.clamp_min(0).sqrt()
    normal = torch.nn.functional.normalize(rays_o + t[..., None] * rays_d, dim=-1)
    return hit, (0.5 + 0.5 * normal).clamp(0, 1)


def cameras() -> torch.Tensor:
    return c2w_from_spherical(torch.tensor(ELEVATIONS), torch.tensor(AZIMUTHS), torch.full((6,), DISTANCE))


def write_sphere_folder(root: Path) -> torch.Tensor:
    """Six RGBA views of the sphere + transforms.json (half the file paths without '.png')."""
    c2w = cameras()
    rays_o, rays_d = get_rays(camera_ray_directions(SIZE, SIZE, torch.full((6,), FOVY)), c2w)
    hit, colour = trace_sphere(rays_o, rays_d)
    frames = []
    for i in range(6):
        rgba = torch.cat([torch.where(hit[i, ..., None], colour[i], torch.zeros(3)), hit[i, ..., None].float()], -1)
        save_image(root / "images" / f"r_{i}.png", rgba)
        frames.append({"file_path": f"./images/r_{i}" + (".png" if i % 2 else ""), "transform_matrix": c2w[i].tolist()})
    camera_angle_x = 2 * math.atan(math.tan(math.radians(FOVY) / 2))  # square images: fovx = fovy
    (root / "transforms.json").write_text(json.dumps({"camera_angle_x": camera_angle_x, "frames": frames}))
    return c2w


@pytest.fixture()
def sphere_folder(tmp_path: Path) -> Path:
    write_sphere_folder(tmp_path)
    return tmp_path


def make(root: Path, **cfg) -> PosedImagesDataModule:
    return PosedImagesDataModule({"root": str(root), **cfg})


def test_registered_and_loads_what_was_written(sphere_folder: Path) -> None:
    assert threestudio_mv.find("posed-images-datamodule") is PosedImagesDataModule
    module = make(sphere_folder, background=[0.2, 0.4, 0.6])
    images = module.images
    assert images.rgb.shape == (6, SIZE, SIZE, 3) and images.mask.shape == (6, SIZE, SIZE, 1)
    assert torch.allclose(images.c2w, cameras(), atol=1e-6)
    assert images.fovy == pytest.approx(FOVY, abs=1e-4)
    rays_o, rays_d = get_rays(camera_ray_directions(SIZE, SIZE, torch.full((6,), FOVY)), cameras())
    hit, colour = trace_sphere(rays_o, rays_d)
    assert torch.equal(images.mask[..., 0] > 0.5, hit)
    assert torch.allclose(images.rgb[hit], colour[hit], atol=1.0 / 255 + 1e-4)
    assert torch.allclose(images.rgb[~hit], torch.tensor([0.2, 0.4, 0.6]).expand(int((~hit).sum()), 3), atol=1e-6)


def test_train_batch_rays_reproduce_the_mask(sphere_folder: Path) -> None:
    module = make(sphere_folder, batch_size=4)
    batch = next(iter(module.train_dataloader()))
    assert batch["rays_o"].shape == (4, SIZE, SIZE, 3) and batch["rgb"].shape == (4, SIZE, SIZE, 3)
    assert batch["mask"].shape == (4, SIZE, SIZE, 1) and batch["c2w"].shape == (4, 4, 4)
    assert batch["index"].unique().numel() == 4
    assert (batch["height"], batch["width"], batch["n_view"]) == (SIZE, SIZE, 4)
    # The batch's own rays see the sphere exactly where the image's alpha says so.
    hit, _ = trace_sphere(batch["rays_o"], batch["rays_d"])
    assert torch.equal(hit, batch["mask"][..., 0] > 0.5)
    index = batch["index"]
    assert torch.allclose(batch["elevation"], torch.tensor(ELEVATIONS)[index], atol=1e-3)
    azimuth_error = (batch["azimuth"] - torch.tensor(AZIMUTHS)[index] + 180) % 360 - 180
    assert azimuth_error.abs().max() < 1e-3
    assert torch.allclose(batch["camera_distances"], torch.full((4,), DISTANCE), atol=1e-5)
    assert torch.allclose(batch["light_positions"].norm(dim=-1), torch.full((4,), 1.5))


def test_all_views_and_random_rays(sphere_folder: Path) -> None:
    batch = next(iter(make(sphere_folder, batch_size="all").train_dataloader()))
    assert batch["rgb"].shape[0] == 6
    module = make(sphere_folder, batch_size=2, rays_per_batch=200)
    batch = next(iter(module.train_dataloader()))
    assert batch["rays_o"].shape == (2, 1, 100, 3) and batch["rgb"].shape == (2, 1, 100, 3)
    assert batch["mask"].shape == (2, 1, 100, 1) and (batch["height"], batch["width"]) == (1, 100)
    hit, colour = trace_sphere(batch["rays_o"], batch["rays_d"])
    assert torch.equal(hit, batch["mask"][..., 0] > 0.5)
    assert torch.allclose(batch["rgb"][hit], colour[hit], atol=1.0 / 255 + 1e-4)


def test_resize_keeps_aspect_and_mask(sphere_folder: Path) -> None:
    module = make(sphere_folder, height=16)
    assert module.images.rgb.shape == (6, 16, 16, 3)
    native = make(sphere_folder).images.mask.mean()
    assert module.images.mask.mean() == pytest.approx(float(native), rel=0.05)
    with pytest.raises(UserError, match=r"data\.height.*data\.width"):
        make(sphere_folder, height=16, width=24)


def test_validation_shows_given_frames_and_test_orbits_at_their_mean(sphere_folder: Path) -> None:
    module = make(sphere_folder, n_val_views=4, n_test_views=10)
    val = list(module.val_dataloader())
    assert len(val) == 1 and val[0]["rgb"].shape == (4, SIZE, SIZE, 3)
    assert torch.equal(val[0]["index"], torch.tensor([0, 2, 3, 5]))
    assert torch.allclose(val[0]["c2w"], cameras()[val[0]["index"]], atol=1e-6)
    test = list(module.test_dataloader())
    assert len(test) == 10 and test[0]["rays_o"].shape == (1, SIZE, SIZE, 3)
    assert torch.allclose(test[0]["elevation"], torch.tensor([np.mean(ELEVATIONS)], dtype=torch.float32), atol=1e-3)
    assert torch.allclose(test[0]["camera_distances"], torch.tensor([DISTANCE]), atol=1e-4)
    assert test[0]["azimuth"].item() == 0.0


def test_missing_or_wrong_root_names_data_root(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"data\.root.*required"):
        PosedImagesDataModule({})
    with pytest.raises(UserError, match=r"data\.root.*not a folder"):
        make(tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"data\.root.*transforms\.json"):
        make(tmp_path)


def test_malformed_folders_name_the_file(sphere_folder: Path) -> None:
    transforms = sphere_folder / "transforms.json"
    meta = json.loads(transforms.read_text())

    transforms.write_text("{not json")
    with pytest.raises(UserError, match=r"transforms\.json: not valid JSON"):
        make(sphere_folder)

    transforms.write_text(json.dumps({**meta, "frames": []}))
    with pytest.raises(UserError, match=r"transforms\.json: 'frames'"):
        make(sphere_folder)

    broken = dict(meta, frames=meta["frames"] + [{"file_path": "./images/r_9", "transform_matrix": meta["frames"][0]["transform_matrix"]}])
    transforms.write_text(json.dumps(broken))
    with pytest.raises(UserError, match=r"transforms\.json: frame 6 image './images/r_9' not found"):
        make(sphere_folder)

    broken = dict(meta, frames=[dict(meta["frames"][0], transform_matrix=[[1, 0, 0]])])
    transforms.write_text(json.dumps(broken))
    with pytest.raises(UserError, match=r"frame 0 'transform_matrix' must be a 4x4"):
        make(sphere_folder)

    transforms.write_text(json.dumps(meta))
    save_image(sphere_folder / "images" / "r_1.png", np.zeros((SIZE, SIZE, 3)))
    with pytest.raises(UserError, match=r"r_1\.png: has no alpha channel"):
        make(sphere_folder)

    save_image(sphere_folder / "images" / "r_1.png", np.zeros((8, 8, 4)))
    with pytest.raises(UserError, match=r"r_1\.png: size 8x8 differs"):
        make(sphere_folder)


def test_recorded_light_follows_the_camera_and_shades(sphere_folder: Path) -> None:
    transforms = sphere_folder / "transforms.json"
    meta = json.loads(transforms.read_text())
    unlit = next(iter(make(sphere_folder).train_dataloader()))
    assert unlit["shading"] == "albedo" and "ambient_ratio" not in unlit
    meta["light"] = {"direction_camera": [0.0, 0.0, 1.0], "ambient_ratio": 0.4}
    transforms.write_text(json.dumps(meta))
    datamodule = make(sphere_folder, batch_size="all")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["shading"] == "diffuse" and batch["ambient_ratio"] == 0.4
    # A light along the camera's +z (towards the viewer) sits behind the camera, far away.
    towards = torch.nn.functional.normalize(batch["light_positions"] - batch["camera_positions"], dim=-1)
    assert torch.allclose(towards, batch["c2w"][:, :3, 2], atol=1e-5)
    test_batch = next(iter(datamodule.test_dataloader()))
    assert test_batch["shading"] == "diffuse"
    meta["light"] = {"direction_camera": [0.0, 0.0], "ambient_ratio": 0.4}
    transforms.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="'light' must be"):
        make(sphere_folder)
