"""Text-to-panorama (MVDiffusion): CAA blocks, correspondences, stitching, rooms and the CLI."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from threestudio_mv import panorama as cli
from threestudio_mv.data.procedural import rooms
from threestudio_mv.eval.panorama import overlap_psnr, psnr
from threestudio_mv.models.mvdiffusion.caa import CAAUNet, panorama_correspondences
from threestudio_mv.models.mvdiffusion.panorama import DEFAULT_PANORAMA_MODEL, OverlapFusion, stitch_equirect
from threestudio_mv.utils import camera


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=7, out_channels=3, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], block_out_channels=[32, 32], layers_per_block=1,
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=32,
    )


def test_fresh_caa_blocks_leave_the_unet_unchanged() -> None:
    unet = tiny_unet().eval()
    sample, text = torch.randn(8, 7, 16, 16), torch.randn(8, 4, 16)
    timestep = torch.full((8,), 500)
    with torch.no_grad():
        plain = unet(sample, timestep, encoder_hidden_states=text).sample
        net = CAAUNet(unet, n_view=8, min_stride=1)
        assert set(net.blocks) == {"down0", "down1", "mid", "up0", "up1"}
        with_caa = net(sample, timestep, text, num_views=8)
        for parameter in net.blocks.parameters():  # a trained block does change it
            parameter.add_(0.05 * torch.randn_like(parameter))
        trained = net(sample, timestep, text, num_views=8)
    assert torch.equal(plain, with_caa)
    assert (trained - plain).abs().max() > 1e-3


def _world_direction(pixel: torch.Tensor, yaw: float, size: int) -> torch.Tensor:
    """World direction through image point (column, row) of the level 90-degree view at ``yaw``."""
    focal = 0.5 * size  # tan(45 deg) = 1
    local = torch.tensor([(pixel[0] - size / 2) / focal, -(pixel[1] - size / 2) / focal, -1.0])
    return torch.nn.functional.normalize(camera.yaw_c2w(torch.tensor([yaw]))[0, :3, :3] @ local, dim=0)


def test_correspondences_map_a_pixel_onto_the_same_world_direction() -> None:
    size = 32
    corr = panorama_correspondences(size, size, size, 90.0, 45.0, kernel=3)
    rows, cols = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    queries = torch.stack([cols, rows], dim=-1).reshape(-1, 2)
    centre = 4  # the middle of the 3x3 neighbourhood
    checked = 0
    for side, yaw in ((0, -45.0), (1, 45.0)):  # neighbours i - 1 and i + 1 of a view at yaw 0
        for index in (5 * size + 3, 16 * size + 16, 20 * size + 28, 31 * size + 30):
            if not corr["valid"][side, index, centre]:
                continue
            target = (corr["grid"][side, index, centre] + 1.0) / 2.0 * size
            a, b = _world_direction(queries[index], 0.0, size), _world_direction(target, yaw, size)
            assert torch.dot(a, b) > 1.0 - 1e-5
            assert corr["offset"][side, index, centre].abs().max() < 1e-3  # maps back onto the query
            checked += 1
    assert checked >= 4
    # Half of each view overlaps each neighbour (45 of 90 degrees): about half the queries are valid.
    assert 0.35 < corr["valid"][:, :, centre].float().mean() < 0.65


def test_stitching_ground_truth_views_reproduces_the_ground_truth_panorama() -> None:
    room = rooms.build_room(rooms.room_keys("heldout")[3], seed=7)
    yaws = camera.panorama_yaws(8, 0.0)
    views = rooms.render_views(room, yaws, 32)["images"].permute(0, 3, 1, 2)
    truth = rooms.render_equirect(room, 64)["image"]
    stitched = stitch_equirect(views, yaws, 90.0, 64)
    rows = stitched["covered"].all(dim=1)
    assert rows.sum() >= 28  # latitudes within ~+-40 degrees are seen by some view everywhere
    assert psnr(stitched["image"][rows], truth[rows]) > 26.0
    assert overlap_psnr(views, yaws, 90.0) > 25.0



def test_overlap_fusion_keeps_consistent_views_and_makes_independent_ones_agree() -> None:
    yaws = camera.panorama_yaws(8, 0.0)
    fusion = OverlapFusion(yaws, 90.0, 32)
    room = rooms.build_room(rooms.room_keys("heldout")[5], seed=3)
    truth = rooms.render_views(room, yaws, 32)["images"].permute(0, 3, 1, 2)
    assert psnr(fusion(truth), truth) > 28.0  # views of one scene already agree: fusion barely moves them
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(16, 3, 4, 4, generator=generator)  # two panoramas of unrelated smooth views
    independent = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    fused = fusion(independent)
    assert fused.shape == independent.shape
    for group in (slice(0, 8), slice(8, 16)):
        assert overlap_psnr(independent[group], yaws, 90.0) < 12.0
        assert overlap_psnr(fused[group], yaws, 90.0) > 25.0  # one colour per direction, up to resampling


def test_room_captions_split_and_paraphrases() -> None:
    train, heldout = set(rooms.room_keys("train")), set(rooms.room_keys("heldout"))
    assert train and heldout and not train & heldout
    for colour in rooms.COLOUR_NAMES:  # every colour is trained as a wall and as a floor
        assert any(key[0] == colour for key in train) and any(key[1] == colour for key in train)
    key = sorted(heldout)[0]
    assert len(set(rooms.room_paraphrases(key))) == 8
    assert rooms.room_caption(key) not in rooms.room_paraphrases(key)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "  ", "--out", "OUT"], "--prompt is empty"),
        (["--prompt", "a room", "--out", "FILE"], "is an existing file"),
        (["--prompt", "a room", "--out", "OUT", "--image", "MISSING"], "does not exist"),
        (["--prompt", "a room", "--out", "OUT", "--image", "FILE"], "is not a readable image"),
    ],
)
def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, capsys, args, message) -> None:
    (tmp_path / "file.txt").write_text("not an image")
    paths = {"OUT": str(tmp_path / "out"), "FILE": str(tmp_path / "file.txt"), "MISSING": str(tmp_path / "missing.png")}
    with pytest.raises(SystemExit) as exit_info:
        cli.main([paths.get(arg, arg) for arg in args])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_cli_bad_input_in_a_fresh_process_has_no_traceback(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "threestudio_mv.panorama", "--prompt", "", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr


@pytest.mark.skipif(not (DEFAULT_PANORAMA_MODEL / "model_index.json").is_file(), reason="bundled panorama model missing")
def test_cli_on_the_bundled_model_writes_panorama_views_and_cameras(tmp_path) -> None:
    given = tmp_path / "view.png"
    Image.fromarray(np.full((48, 64, 3), (200, 30, 30), dtype=np.uint8)).save(given)
    out = tmp_path / "pano"
    cli.main(["--prompt", "a room with crimson walls and a chocolate floor", "--out", str(out), "--steps", "2",
              "--image", str(given)])
    with Image.open(out / "panorama.png") as image:
        assert image.width == 2 * image.height
    cameras = json.loads((out / "cameras.json").read_text())
    assert cameras["fov_deg"] == 90.0 and len(cameras["frames"]) == 8
    for index, frame in enumerate(cameras["frames"]):
        assert (out / frame["file_path"]).is_file()
        assert frame["yaw_deg"] == pytest.approx(45.0 * index)
        c2w = torch.tensor(frame["c2w"])
        forward = -c2w[:3, 2]
        yaw = np.radians(45.0 * index)
        assert torch.allclose(forward, torch.tensor([np.cos(yaw), np.sin(yaw), 0.0], dtype=torch.float32), atol=1e-5)
    with Image.open(out / cameras["frames"][0]["file_path"]) as view0:
        assert np.abs(np.asarray(view0, dtype=np.float32) - [200, 30, 30]).max() <= 1  # the given view is kept



@pytest.mark.parametrize("stage, trains, keeps", [("caa", "blocks", "unet"), ("base", "unet", "blocks")])
def test_a_stage_continues_a_panorama_model_training_only_its_part(tmp_path, monkeypatch, stage, trains, keeps) -> None:
    from threestudio_mv.models.mvdiffusion import panorama as model_module

    class ZeroTexts(dict):  # every caption -> one fixed embedding (no sentence encoder in a unit test)
        def __missing__(self, caption: str) -> torch.Tensor:
            return torch.zeros(24, 384)

    monkeypatch.setattr(model_module, "_text_table", lambda encoder, cache_dir: ZeroTexts())
    cfg = model_module.TrainConfig(stage=stage, out=tmp_path / stage, steps=2, init=DEFAULT_PANORAMA_MODEL, rooms_per_step=1,
                                   lr=1e-2, warmup=1, ema_decay=0.0, ckpt_every=1, given_prob=0.5, command="continue")
    folder = model_module.train(cfg)
    before = model_module.PanoramaModel.from_pretrained(DEFAULT_PANORAMA_MODEL)
    after = model_module.PanoramaModel.from_pretrained(folder)
    kept_before, kept_after = getattr(before.net, keeps).state_dict(), getattr(after.net, keeps).state_dict()
    for name, weight in kept_before.items():
        assert torch.equal(weight, kept_after[name]), name
    start = torch.cat([w.flatten().float() for w in getattr(before.net, trains).state_dict().values()])
    end = torch.cat([w.flatten().float() for w in getattr(after.net, trains).state_dict().values()])
    assert (end != start).any(), f"the {trains} did not train"
    assert (end - start).abs().max() < 0.1  # continued from the bundled weights, not from fresh ones
    assert after.metadata.training_command.endswith("&& continue")
    assert after.metadata.guidance_scale == before.metadata.guidance_scale
