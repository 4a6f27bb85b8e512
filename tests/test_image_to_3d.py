"""Image-to-3D (issue 18): the pose-free image-to-views model, its CLI, and the one-command pipeline."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from threestudio_mv.models.mvdiffusion.image_to_views import (
    ImageToViewsMetadata,
    ImageToViewsModel,
    frame_layout,
    sample_views,
    target_cameras,
    training_batch,
)
from threestudio_mv.data.image_views import ImageViewsConfig, default_views_dir
from threestudio_mv.models.mvdiffusion.sampler import noise_targets, target_loss, training_target

REPO = Path(__file__).resolve().parents[1]
SIZE = 16


def tiny_model(randomise_global: bool = False) -> ImageToViewsModel:
    """A 16 px model; ``randomise_global`` gives the zero-initialised global attention random weights."""
    torch.manual_seed(0)
    model = ImageToViewsModel.create(ImageToViewsMetadata(image_size=SIZE, num_inference_steps=2)).eval()
    if randomise_global:
        for name, module in model.unet.named_modules():
            if name.endswith("attn1"):
                torch.nn.init.normal_(module.to_out[0].weight, std=0.2)
    return model


def frames(n_inputs: int, n_targets: int) -> torch.Tensor:
    return torch.rand(n_inputs + n_targets, 4, SIZE, SIZE) * 2 - 1


def test_mask_channel_and_target_index_change_the_output() -> None:
    model = tiny_model()
    sample = frames(1, 2)
    is_reference, index = frame_layout(1, [0, 5])
    t = torch.full((3,), 500)
    base = model(sample, t, is_reference, index, 3)
    flipped = model(sample, t, ~is_reference, index, 3)
    reindexed = model(sample, t, is_reference, torch.tensor([0, 3, 9]), 3)
    assert not torch.allclose(base, flipped, atol=1e-4)
    assert not torch.allclose(base[1:], reindexed[1:], atol=1e-4)
    assert torch.allclose(base[0], reindexed[0], atol=1e-5)  # the condition's index did not change


def test_global_attention_carries_the_inputs_to_the_targets() -> None:
    model = tiny_model(randomise_global=True)
    sample = frames(1, 4)
    other = sample.clone()
    other[0] = torch.rand(4, SIZE, SIZE) * 2 - 1  # a different input image
    is_reference, index = frame_layout(1, range(4))
    t = torch.where(is_reference, 0, 700)
    with torch.no_grad():
        a, b = model(sample, t, is_reference, index, 5), model(other, t, is_reference, index, 5)
        assert (a[1:] - b[1:]).abs().max() > 1e-3
        model.set_global_attention(False)
        a, b = model(sample, t, is_reference, index, 5), model(other, t, is_reference, index, 5)
        assert torch.allclose(a[1:], b[1:], atol=1e-6)
    # A fresh model's global attention is the identity: its output projections start at zero.
    fresh = tiny_model()
    assert all(m.to_out[0].weight.abs().max() == 0 for n, m in fresh.unet.named_modules() if n.endswith("attn1"))


def test_training_step_on_a_subset_of_targets_lowers_the_loss() -> None:
    from diffusers import DDPMScheduler

    model = tiny_model().train()
    meta = model.metadata
    generator = torch.Generator().manual_seed(0)
    batch = training_batch(["a red cube", "a blue cone"], 1, 4, meta, generator)
    assert batch["clean"].shape == (2 * 5, 4, SIZE, SIZE) and batch["num_views"] == 5
    assert batch["is_reference"].tolist() == [True, False, False, False, False] * 2
    batch = {k: v[:5] if torch.is_tensor(v) else v for k, v in batch.items()}  # one object keeps the test quick
    assert batch["target_index"][0] == 0 and all(1 <= int(i) <= 16 for i in batch["target_index"][1:5])
    scheduler = DDPMScheduler.from_config(model.scheduler_config)
    optimizer = torch.optim.Adam(model.unet.parameters(), lr=2e-3)
    noise = torch.randn(batch["clean"].shape, generator=generator)
    timesteps = torch.where(batch["is_reference"], 0, 600)
    losses = []
    for _ in range(6):
        noisy = noise_targets(scheduler, batch["clean"], noise, timesteps, batch["is_reference"])
        prediction = model(noisy, timesteps, batch["is_reference"], batch["target_index"], 5)
        loss = target_loss(prediction, training_target(scheduler, batch["clean"], noise, timesteps), batch["is_reference"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_sampling_generates_all_16_targets_in_one_pass() -> None:
    model = tiny_model()
    seen = []
    forward = model.forward
    model.forward = lambda sample, t, ref, index, num_views: seen.append((sample.shape[0], num_views, index.tolist())) or forward(sample, t, ref, index, num_views)
    conditions = frames(2, 0)
    views = sample_views(model, conditions, torch.Generator().manual_seed(0), guidance_scale=1.0)
    assert views.shape == (16, 4, SIZE, SIZE) and 0.0 <= float(views.min()) and float(views.max()) <= 1.0
    assert seen and all(n == 18 and f == 18 for n, f, _ in seen)
    assert seen[0][2] == [0, 0] + list(range(1, 17))


def test_first_target_follows_the_input_azimuth(tmp_path: Path) -> None:
    from threestudio_mv.models.mvdiffusion.image_to_views import write_views
    from threestudio_mv.utils.camera import spherical_from_position

    meta = ImageToViewsMetadata(image_size=SIZE)
    cameras = target_cameras(meta, 37.0)
    elevation, azimuth, _ = spherical_from_position(cameras["c2w"][:, :3, 3])
    assert torch.allclose(azimuth[:8], (37.0 + 45.0 * torch.arange(8) + 180) % 360 - 180, atol=1e-3)
    assert torch.allclose(elevation, torch.tensor([0.0] * 8 + [30.0] * 8), atol=1e-3)
    # The written cameras are in the frame where the first input is seen from azimuth 0.
    write_views(tmp_path, torch.rand(16, 4, SIZE, SIZE), torch.rand(1, SIZE, SIZE, 4), meta)
    frames_ = json.loads((tmp_path / "transforms.json").read_text())["frames"]
    position = np.array(frames_[0]["transform_matrix"])[:3, 3]
    assert position[0] > 0 and abs(position[1]) < 1e-5 and abs(position[2]) < 1e-5
    assert len(frames_) == 16 and (tmp_path / "views.png").is_file()


def test_save_load_round_trip(tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    model = tiny_model(randomise_global=True)
    model.metadata.training_command = "python -m threestudio_mv.i2mv train --stage eps1 ..."
    model.save_pretrained(tmp_path / "m")
    loaded = ImageToViewsModel.from_pretrained(tmp_path / "m")
    assert loaded.metadata == model.metadata and loaded.scheduler_config["prediction_type"] == "epsilon"
    assert UNet2DConditionModel.from_pretrained(str(tmp_path / "m" / "unet")).config.num_class_embeds == 17
    sample = frames(1, 3)
    is_reference, index = frame_layout(1, [0, 1, 2])
    t = torch.where(is_reference, 0, 400)
    with torch.no_grad():
        expected = model.half().float()(sample, t, is_reference, index, 4)  # the folder holds float16 weights
        assert torch.allclose(loaded(sample, t, is_reference, index, 4), expected, atol=1e-4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("i2mv") / "model"
    tiny_model().save_pretrained(folder)
    return folder


def test_cli_errors_name_the_file(tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from threestudio_mv.i2mv import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.png").write_text("not an image")
    Image.fromarray(np.full((40, 40, 3), 255, np.uint8)).save(tmp_path / "blank.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "busy.png")
    cases = {
        str(tmp_path / "missing.png"): "does not exist",
        str(tmp_path / "empty"): "no images",
        str(tmp_path / "notes.png"): "cannot read image",
        str(tmp_path / "blank.png"): "no object",
        str(tmp_path / "busy.png"): "not one plain colour",
    }
    for path, problem in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main(["--input", path, "--out", str(tmp_path / "out"), "--model", str(model_dir)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1, lines
        assert Path(path).name in lines[0] and problem in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_one_command_pipeline_writes_a_mesh(tmp_path: Path, model_dir: Path) -> None:
    image = np.full((48, 64, 3), 240, np.uint8)  # RGB on a plain background, not square
    image[12:36, 20:40] = (200, 30, 30)
    Image.fromarray(image).save(tmp_path / "photo.png")
    result = subprocess.run(
        [sys.executable, "launch.py", "--config", "configs/image-to-3d.yaml", "--train", "--export",
         f"data.image_path={tmp_path / 'photo.png'}", f"data.model={model_dir}", f"data.views_dir={tmp_path / 'views'}",
         f"exp_root_dir={tmp_path}", "tag=photo", "use_timestamp=false", "trainer.enable_progress_bar=false",
         "trainer.max_steps=4", "trainer.val_check_interval=4", "data.height=16", "data.n_test_views=2",
         "system.geometry.isosurface_resolution=32", "system.exporter.texture_size=64"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    transforms = json.loads((tmp_path / "views" / "transforms.json").read_text())
    assert len(transforms["frames"]) == 16
    export = tmp_path / "image-to-3d" / "photo" / "save" / "it4-export"
    assert (export / "model.obj").is_file() and (export / "model.glb").is_file()
    grid = np.asarray(Image.open(tmp_path / "image-to-3d" / "photo" / "save" / "it4-val-0.png"))
    assert grid.shape[1] > 5 * 16  # input | generated view | render | normal | opacity


def test_training_resumes_from_its_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from threestudio_mv.models.mvdiffusion import image_to_views
    from threestudio_mv.models.mvdiffusion.image_to_views import TrainConfig, train

    monkeypatch.setattr(image_to_views, "_target_mean", lambda meta, generator: [0.8, 0.8, 0.8, -0.7])  # skip its renders

    def run(out: Path, steps: int) -> Path:
        return train(TrainConfig(stage="eps1", out=out, steps=steps, objects_per_step=1, train_targets=2,
                                 ckpt_every=1, quality_assets=0, warmup=2))

    run(tmp_path / "straight", 2)
    run(tmp_path / "resumed", 1)
    folder = run(tmp_path / "resumed", 2)  # a new process would do the same: everything comes from ckpt.pt
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=False)
    assert resumed["step"] == 2 and len((tmp_path / "resumed" / "log.csv").read_text().splitlines()) == 2
    for key, value in straight["trained"].items():
        assert torch.allclose(value, resumed["trained"][key], atol=1e-6), key
    meta = ImageToViewsModel.from_pretrained(folder).metadata
    assert meta.stages[-1]["stage"] == "eps1" and meta.training_command == ""


def test_training_with_rendering_workers_trains_and_exports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU route's data path (batches rendered in DataLoader processes), here on the CPU."""
    from threestudio_mv.models.mvdiffusion import image_to_views
    from threestudio_mv.models.mvdiffusion.image_to_views import TrainConfig, train

    monkeypatch.setattr(image_to_views, "_target_mean", lambda meta, generator: [0.8, 0.8, 0.8, -0.7])
    folder = train(TrainConfig(stage="eps1", out=tmp_path / "run", steps=2, objects_per_step=1, train_targets=2,
                               ckpt_every=1, quality_assets=0, warmup=1, workers=1, stretch=0.5))
    state = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    assert state["step"] == 2 and all(v.device.type == "cpu" for v in state["trained"].values())
    losses = [float(line.split(",")[1]) for line in (tmp_path / "run" / "log.csv").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert ImageToViewsModel.from_pretrained(folder).metadata.stages[-1]["stage"] == "eps1"


def test_views_cache_follows_the_model_folder_settings(tmp_path: Path) -> None:
    image = tmp_path / "in.png"
    image.write_bytes(b"not read as an image here")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"metadata": {"guidance_scale": 2.0}}))
    cfg = ImageViewsConfig(image_path=str(image), model=str(folder))
    before = default_views_dir([image], cfg)
    assert default_views_dir([image], cfg) == before
    (folder / "model_index.json").write_text(json.dumps({"metadata": {"guidance_scale": 4.0}}))
    assert default_views_dir([image], cfg) != before  # new default sampling: not the old views
    assert default_views_dir([image], ImageViewsConfig(image_path=str(image), model=str(folder), seed=1)) != default_views_dir([image], cfg)


def test_match_palette_snaps_straight_colours_and_keeps_coverage() -> None:
    from threestudio_mv.data.foreground import colour_palette, match_palette

    red, blue = torch.tensor([0.9, 0.1, 0.1]), torch.tensor([0.1, 0.2, 0.8])
    straight = torch.stack([red, blue]).view(1, 2, 3).expand(4, 2, 3).permute(2, 0, 1)[None]  # 1 x 3 x 4 x 2: red | blue
    palette = colour_palette(straight, torch.ones(1, 1, 4, 2))
    assert palette.shape == (2, 3) and torch.allclose(palette.sort(dim=0).values, torch.stack([red, blue]).sort(dim=0).values, atol=1 / 63)
    alpha = torch.full((1, 1, 2, 2), 0.6)
    alpha[..., 1, 1] = 0.0
    pinkish = torch.tensor([0.8, 0.3, 0.25]).view(1, 3, 1, 1) * alpha + (1.0 - alpha)  # composited over white
    matched = match_palette(pinkish, alpha, palette, (1.0, 1.0, 1.0))
    expected = palette[palette[:, 0].argmax()].view(1, 3, 1, 1) * 0.6 + 0.4  # the red, at the same coverage
    assert torch.allclose(matched[..., 0, 0], expected[..., 0, 0], atol=1e-6)
    assert torch.equal(matched[..., 1, 1], pinkish[..., 1, 1])  # uncovered: as given
    assert torch.equal(match_palette(pinkish, alpha, palette[:0], (1.0, 1.0, 1.0)), pinkish)  # no palette: as given


def test_generated_views_take_the_inputs_colours_when_matching() -> None:
    from threestudio_mv.models.mvdiffusion.image_to_views import generate_views

    model = tiny_model()
    colour = torch.tensor([0.2, 0.6, 0.3])
    inputs = torch.zeros(1, SIZE, SIZE, 4)
    inputs[0, 4:12, 4:12] = torch.cat([colour, torch.ones(1)])  # premultiplied, alpha 1: one colour
    raw = generate_views(model, inputs, match_colours=False)
    matched = generate_views(model, inputs, match_colours=True)
    covered = matched[:, 3] > 0.5
    assert covered.sum() > 0 and torch.equal(matched[:, 3], raw[:, 3])  # the same sample: only colours change
    straight = matched[:, :3].permute(0, 2, 3, 1)[covered]
    alpha = matched[:, 3][covered][:, None]
    assert torch.allclose((straight - (1.0 - alpha)) / alpha, colour.expand_as(straight), atol=1.5 / 63)
    assert not torch.allclose(raw[:, :3], matched[:, :3])


def test_eval_sampling_arms_parse_and_name_a_bad_setting(capsys: pytest.CaptureFixture) -> None:
    from threestudio_mv.eval.image_to_3d import main, parse_sampling

    assert parse_sampling("guidance_scale=2,num_inference_steps=10") == {"guidance_scale": 2.0, "num_inference_steps": 10}
    for spec, named in (("cfg=2", "'cfg'"), ("eta=high", "'eta'")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--sampling-arm", spec])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and named in error, error


def test_stretched_training_objects_change_shape_and_keep_the_box() -> None:
    from threestudio_mv.data.procedural.captions import parse_caption
    from threestudio_mv.models.mvdiffusion.image_to_views import stretch_factors

    generator = torch.Generator().manual_seed(0)
    scales = torch.stack([stretch_factors(0.6, generator) for _ in range(200)])
    unchanged = (scales == 1.0).all(dim=1)
    assert 0.3 < float(unchanged.float().mean()) < 0.7  # about half the objects keep their shape
    assert torch.allclose(scales.max(dim=1).values, torch.ones(200))  # the longest axis keeps the box filled
    assert float(scales.min()) >= 0.4 - 1e-6
    assert torch.equal(stretch_factors(0.0, generator), torch.ones(3))
    asset = parse_caption("a red cube")
    lo, hi = asset.stretched([1.0, 0.5, 1.0]).bounds()
    base_lo, base_hi = asset.bounds()
    assert float(hi[1] - lo[1]) == pytest.approx(0.5 * float(base_hi[1] - base_lo[1]), rel=1e-4)
    meta = ImageToViewsMetadata(image_size=SIZE)
    batch = training_batch(["a red cube", "a blue mug"], 1, 3, meta, torch.Generator().manual_seed(1), stretch=0.6)
    assert batch["clean"].shape == (8, 4, SIZE, SIZE) and batch["num_views"] == 4
    from threestudio_mv.models.mvdiffusion.image_to_views import train_main
    from threestudio_mv.utils.errors import UserError

    with pytest.raises(UserError, match="--stretch"):
        train_main(["--stage", "vmix", "--out", "unused", "--steps", "1", "--stretch", "1.5"])


def test_recoloured_training_objects_keep_their_shape_and_change_colour() -> None:
    from threestudio_mv.data.procedural.captions import parse_caption
    from threestudio_mv.data.procedural.colours import NAMED_COLOURS
    from threestudio_mv.models.mvdiffusion.image_to_views import random_colours

    asset = parse_caption("a pink car with a white roof")
    generator = torch.Generator().manual_seed(0)
    draws = [random_colours(asset.parts, generator) for _ in range(100)]
    single = [len(set(d.values())) == 1 for d in draws]
    assert 0.3 < np.mean(single) < 0.7 and all(set(d) == set(asset.parts) for d in draws)
    recoloured = asset.recoloured({part: "green" for part in asset.parts})
    points = torch.rand(300, 3) - 0.5
    assert torch.equal(recoloured.sdf(points), asset.sdf(points))
    assert torch.allclose(recoloured.albedo(points), recoloured.palette()[0].expand(300, 3))
    with pytest.raises(ValueError, match="parts"):
        asset.recoloured({"body": "green"})
    meta = ImageToViewsMetadata(image_size=SIZE)

    def foreground_colour(recolour: float, seed: int) -> torch.Tensor:
        clean = training_batch(["a pink car"], 1, 2, meta, torch.Generator().manual_seed(seed), recolour=recolour)["clean"]
        inside = clean[:, 3] > 0.9
        colour = ((clean[:, :3] + 1) / 2).permute(0, 2, 3, 1)[inside].median(dim=0).values
        return colour / colour.sum()  # chromaticity: the shading scales all three channels

    pink = torch.tensor(NAMED_COLOURS["pink"])
    pink = pink / pink.sum()
    assert all(float((foreground_colour(0.0, seed) - pink).abs().max()) < 0.03 for seed in range(3))
    assert any(float((foreground_colour(1.0, seed) - pink).abs().max()) > 0.1 for seed in range(3))
    from threestudio_mv.models.mvdiffusion.image_to_views import train_main
    from threestudio_mv.utils.errors import UserError

    with pytest.raises(UserError, match="--recolour"):
        train_main(["--stage", "vmix", "--out", "unused", "--steps", "1", "--recolour", "2"])
