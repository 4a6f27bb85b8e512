"""random-multiview-camera-datamodule: batch layout, view groups, framing, milestones, eval orbits."""
import math

import pytest
import torch

import threestudio_mv
from threestudio_mv.data.random_cameras import RandomMultiviewCameraDataModule
from threestudio_mv.utils.camera import project_points
from threestudio_mv.utils.errors import UserError

VIEW_KEYS = {"rays_o", "rays_d", "c2w", "mvp_mtx", "camera_positions", "light_positions", "elevation", "azimuth",
             "camera_distances", "fovy", "height", "width", "n_view"}


def make(**cfg) -> RandomMultiviewCameraDataModule:
    return RandomMultiviewCameraDataModule(cfg)


def train_batch(module: RandomMultiviewCameraDataModule) -> dict:
    return next(iter(module.train_dataloader()))


def test_registered_under_its_name() -> None:
    assert threestudio_mv.find("random-multiview-camera-datamodule") is RandomMultiviewCameraDataModule


def test_train_batch_keys_and_shapes() -> None:
    batch = train_batch(make(batch_size=8, n_view=4, width=24, height=16))
    assert set(batch) == VIEW_KEYS
    assert batch["rays_o"].shape == batch["rays_d"].shape == (8, 16, 24, 3)
    assert batch["c2w"].shape == batch["mvp_mtx"].shape == (8, 4, 4)
    assert batch["camera_positions"].shape == batch["light_positions"].shape == (8, 3)
    for key in ("elevation", "azimuth", "camera_distances", "fovy"):
        assert batch[key].shape == (8,)
    assert (batch["height"], batch["width"], batch["n_view"]) == (16, 24, 4)
    assert torch.allclose(batch["rays_d"].norm(dim=-1), torch.ones(8, 16, 24), atol=1e-5)
    assert torch.allclose(batch["rays_o"], batch["camera_positions"][:, None, None, :].expand(-1, 16, 24, -1))


def test_views_of_a_group_share_camera_and_are_evenly_spaced() -> None:
    batch = train_batch(make(batch_size=12, n_view=4, elevation_range=[5.0, 25.0]))
    for key in ("elevation", "fovy", "camera_distances"):
        groups = batch[key].view(3, 4)
        assert torch.allclose(groups, groups[:, :1].expand(-1, 4)), key
        assert groups[:, 0].unique().numel() == 3, f"{key} should differ between groups"
    azimuth = batch["azimuth"].view(3, 4)
    step = (azimuth[:, 1:] - azimuth[:, :-1]) % 360.0
    assert torch.allclose(step, torch.full_like(step, 90.0), atol=1e-3)
    assert ((batch["elevation"] >= 5.0) & (batch["elevation"] <= 25.0)).all()
    # The positions follow the angles: z = d sin(elevation).
    z = batch["camera_distances"] * torch.sin(torch.deg2rad(batch["elevation"]))
    assert torch.allclose(batch["camera_positions"][:, 2], z, atol=1e-5)


def test_every_camera_looks_at_the_origin() -> None:
    batch = train_batch(make(batch_size=8, width=32, height=32))
    for i in range(8):
        col, row, depth = project_points(torch.zeros(1, 3), batch["c2w"][i], batch["fovy"][i], 32, 32)[0]
        assert abs(col - 16) < 1e-3 and abs(row - 16) < 1e-3 and depth > 0
        clip = batch["mvp_mtx"][i] @ torch.tensor([0.0, 0.0, 0.0, 1.0])
        assert torch.allclose(clip[:2] / clip[3], torch.zeros(2), atol=1e-5)


def test_relative_radius_keeps_the_framing() -> None:
    batch = train_batch(make(batch_size=16, fovy_range=[20.0, 60.0], camera_distance_range=[0.9, 0.9]))
    relative = batch["camera_distances"] * torch.tan(torch.deg2rad(batch["fovy"]) / 2)
    assert torch.allclose(relative, torch.full_like(relative, 0.9), atol=1e-5)
    assert batch["fovy"].std() > 1.0  # the FOV varies, the framing does not
    absolute = train_batch(make(batch_size=16, relative_radius=False, camera_distance_range=[2.0, 2.5]))
    assert ((absolute["camera_distances"] >= 2.0) & (absolute["camera_distances"] <= 2.5)).all()


def test_resolution_milestones_switch_size_and_batch() -> None:
    module = make(batch_size=[8, 4], width=[16, 32], height=[16, 32], resolution_milestones=[10])
    iterator = iter(module.train_dataloader())
    assert next(iterator)["rays_o"].shape == (8, 16, 16, 3)
    module.update_step(0, 9)
    assert next(iterator)["rays_o"].shape == (8, 16, 16, 3)
    module.update_step(0, 10)  # the DataModule forwards to its train dataset
    batch = next(iterator)
    assert batch["rays_o"].shape == (4, 32, 32, 3)
    assert (batch["height"], batch["width"]) == (32, 32)


def test_batch_size_must_be_a_multiple_of_n_view() -> None:
    with pytest.raises(UserError, match=r"data\.batch_size.*multiple of data\.n_view"):
        make(batch_size=6, n_view=4)
    with pytest.raises(UserError, match=r"data\.batch_size"):
        make(batch_size=[8, 4, 4], resolution_milestones=[10])
    with pytest.raises(UserError, match=r"data\.light_sample_strategy"):
        make(light_sample_strategy="sun")
    with pytest.raises(UserError, match=r"data\.not_a_key"):
        make(not_a_key=1)


def test_light_strategies() -> None:
    camera = train_batch(make(light_sample_strategy="camera"))
    assert torch.equal(camera["light_positions"], camera["camera_positions"])
    dreamfusion = train_batch(make(batch_size=32, light_distance_range=[0.8, 1.5]))
    distance = dreamfusion["light_positions"].norm(dim=-1)
    assert ((distance >= 0.8 - 1e-5) & (distance <= 1.5 + 1e-5)).all()
    # Lights sit on the camera's side of the object on average.
    cosine = torch.nn.functional.cosine_similarity(dreamfusion["light_positions"], dreamfusion["camera_positions"])
    assert cosine.mean() > 0.5


def test_camera_light_follows_every_camera_with_its_ambient_ratio() -> None:
    light = {"direction_camera": [0.0, 1.0, 1.0], "ambient_ratio": 0.3}
    module = make(batch_size=8, camera_light=light)
    for batch in (train_batch(module), next(iter(module.val_dataloader())), next(iter(module.test_dataloader()))):
        assert batch["ambient_ratio"] == pytest.approx(0.3)
        # from the camera, the light lies up and back (towards the viewer) in the camera's own frame
        towards = torch.nn.functional.normalize(batch["light_positions"] - batch["camera_positions"], dim=-1)
        in_camera = torch.einsum("bji,bj->bi", batch["c2w"][:, :3, :3], towards)
        assert torch.allclose(in_camera, torch.tensor([0.0, 1.0, 1.0]).div(2**0.5).expand_as(in_camera), atol=1e-5)
    assert "ambient_ratio" not in train_batch(make())


@pytest.mark.parametrize("light", [{"direction_camera": [0.0, 0.0, 0.0], "ambient_ratio": 0.5},
                                   {"direction_camera": [0.0, 0.0, 1.0], "ambient_ratio": 1.5}])
def test_bad_camera_light_is_a_user_error(light) -> None:
    with pytest.raises(UserError, match="data.camera_light"):
        make(camera_light=light)


def test_validation_is_one_batch_of_evenly_spaced_views_from_the_front() -> None:
    module = make(n_val_views=4, eval_elevation_deg=15.0, eval_fovy_deg=40.0, eval_camera_distance=0.92,
                  eval_height=16, eval_width=16)
    batches = list(module.val_dataloader())
    assert len(batches) == 1
    batch = batches[0]
    assert set(batch) == VIEW_KEYS | {"index"}
    assert batch["rays_o"].shape == (4, 16, 16, 3)
    assert torch.allclose(batch["azimuth"], torch.tensor([0.0, 90.0, -180.0, -90.0]))
    assert torch.equal(batch["index"], torch.arange(4))
    assert torch.allclose(batch["elevation"], torch.full((4,), 15.0))
    assert torch.allclose(batch["camera_distances"], torch.full((4,), 0.92 / math.tan(math.radians(20.0))), atol=1e-5)
    # Azimuth 0 is the front: the camera sits on +x.
    assert torch.allclose(batch["camera_positions"][0, 1], torch.tensor(0.0), atol=1e-6)
    assert batch["camera_positions"][0, 0] > 0


def test_test_orbit_is_a_turntable_one_frame_per_batch() -> None:
    module = make(n_test_views=12, eval_height=8, eval_width=8)
    batches = list(module.test_dataloader())
    assert len(batches) == 12
    assert all(b["rays_o"].shape == (1, 8, 8, 3) for b in batches)
    assert [int(b["index"]) for b in batches] == list(range(12))
    azimuth = torch.cat([b["azimuth"] for b in batches])
    assert azimuth[0] == 0.0
    step = (azimuth[1:] - azimuth[:-1]) % 360.0
    assert torch.allclose(step, torch.full_like(step, 30.0), atol=1e-4)
