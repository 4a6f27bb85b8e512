"""Training the multi-view diffusion model: data module, loss going down, export, DDP (slow)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from threestudio_mv.data.multiview_shards import ProceduralMultiviewDataModule
from threestudio_mv.data.procedural.dataset import FORMAT
from threestudio_mv.models.mvdiffusion.model import MultiViewDiffusionModel
from threestudio_mv.systems.mvdiffusion_train import MVDiffusionTrainSystem
from threestudio_mv.utils.camera import mvdream_camera_condition, sample_view_groups
from threestudio_mv.utils.errors import UserError
from threestudio_mv.utils.trainer import warmup_cosine_factor as lr_factor

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220)}


def write_fake_dataset(root: Path, num_assets: int = 6, views: int = 8, size: int = 16) -> Path:
    """A dataset folder in the procedural writer's format: flat squares or discs in two colours."""
    root.mkdir(parents=True, exist_ok=True)
    cameras = sample_view_groups(num_assets * views // 4, 4, generator=torch.Generator().manual_seed(0))
    rows, cols = np.mgrid[0:size, 0:size] + 0.5
    disc = ((rows - size / 2) ** 2 + (cols - size / 2) ** 2 < (size / 3) ** 2)
    square = (np.abs(rows - size / 2) < size / 3) & (np.abs(cols - size / 2) < size / 3)
    rgba = np.zeros((num_assets, views, size, size, 4), dtype=np.uint8)
    records = []
    for asset in range(num_assets):
        colour = list(COLOURS)[asset % 2]
        shape = "disc" if asset % 3 == 0 else "square"
        mask = disc if shape == "disc" else square
        rgba[asset, :, mask, :3] = COLOURS[colour]
        rgba[asset, :, mask, 3] = 255
        records.append({"caption": f"a {colour} {shape}", "paraphrases": [f"one {colour} {shape}"], "spec": {}})
    per_view = lambda key: cameras[key].reshape(num_assets, views, *cameras[key].shape[1:]).numpy()  # noqa: E731
    np.savez(
        root / "shard_00000.npz", rgba=rgba, c2w=per_view("c2w").astype(np.float32), fovy=per_view("fovy"),
        elevation=per_view("elevation"), azimuth=per_view("azimuth"), camera_distances=per_view("camera_distances"),
        asset_index=np.arange(num_assets),
    )
    (root / "shard_00000.json").write_text(json.dumps(records))
    (root / "meta.json").write_text(json.dumps({"format": FORMAT, "num_shards": 1, "num": num_assets, "views": views, "size": size}))
    return root


def tiny_system_config(tmp_path: Path) -> dict:
    return {
        "model": {
            "image_size": 16,
            "unet": {"block_out_channels": [16, 32], "attention_levels": [False, True], "norm_num_groups": 8},
            "text_encoder": {"type": "learned", "words": ["a", "red", "blue", "disc", "square"], "dim": 32, "max_length": 6},
        },
        "optimizer": {"name": "AdamW", "args": {"lr": 3e-3}},
        "warmup_steps": 1,
        "export_every_n_steps": 0,
        "val_inference_steps": 3,
    }


def test_datamodule_batches_keep_objects_apart(tmp_path: Path) -> None:
    root = write_fake_dataset(tmp_path / "data")
    datamodule = ProceduralMultiviewDataModule({"root": str(root), "batch_size": 3, "single_view_prob": 0.0, "paraphrase_prob": 0.0})
    datamodule.setup("fit")
    batch = datamodule.train_set[0]
    assert batch["images"].shape == (12, 3, 16, 16) and batch["num_views"] == 4
    assert -1.0 <= batch["images"].min() and batch["images"].max() <= 1.0
    # Every group of 4 views is one object: same caption, azimuths 90 degrees apart.
    for group in range(3):
        captions = batch["captions"][group * 4 : group * 4 + 4]
        assert len(set(captions)) == 1
        positions = batch["c2w"][group * 4 : group * 4 + 4, :2, 3]
        angles = torch.rad2deg(torch.atan2(positions[:, 1], positions[:, 0]))
        steps = (angles.diff() % 360.0)
        assert torch.allclose(steps, torch.full_like(steps, 90.0), atol=1e-3)
    assert torch.allclose(batch["camera"], mvdream_camera_condition(batch["c2w"]))
    assert "" not in datamodule.texts() and "one red disc" in datamodule.texts()


def test_datamodule_single_views_have_no_camera(tmp_path: Path) -> None:
    root = write_fake_dataset(tmp_path / "data")
    datamodule = ProceduralMultiviewDataModule({"root": str(root), "batch_size": 2, "single_view_prob": 1.0})
    datamodule.setup("fit")
    batch = datamodule.train_set[5]
    assert batch["num_views"] == 1 and batch["images"].shape[0] == 8
    assert torch.count_nonzero(batch["camera"]) == 0


def test_datamodule_bad_root_is_a_user_error(tmp_path: Path) -> None:
    datamodule = ProceduralMultiviewDataModule({"root": str(tmp_path / "nowhere")})
    with pytest.raises(UserError, match="data.root"):
        datamodule.setup("fit")


def test_lr_factor_warms_up_then_decays_on_a_cosine() -> None:
    assert lr_factor(0, 10, None, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(50, 10, None, 100, 0.1) == 1.0  # no decay configured: constant
    assert lr_factor(40, 10, 40, 100, 0.1) == 1.0  # decay starts after its step
    assert lr_factor(70, 10, 40, 100, 0.1) == pytest.approx(0.55)  # halfway: the mean of 1 and 0.1
    assert lr_factor(100, 10, 40, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 10, 40, 100, 0.1) == pytest.approx(0.1)  # held after the end
    assert lr_factor(60, 10, 40, 100, 0.1) > lr_factor(80, 10, 40, 100, 0.1)


def test_tiny_model_learns_and_exports(tmp_path: Path, quick_trainer) -> None:
    root = write_fake_dataset(tmp_path / "data")
    datamodule = ProceduralMultiviewDataModule({"root": str(root), "batch_size": 2, "single_view_prob": 0.2, "val_num_captions": 2})
    config = {**tiny_system_config(tmp_path), "decay_start_step": 20, "min_lr_ratio": 0.2}
    system = MVDiffusionTrainSystem(config, trial_dir=str(tmp_path / "trial"))
    datamodule.setup("fit")
    fixed = datamodule.train_set[0]
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(fixed["images"].shape, generator=generator)
    timesteps = torch.randint(0, 1000, (fixed["images"].shape[0],), generator=generator)

    def fixed_loss() -> float:
        model = system.model
        with torch.no_grad():
            noisy = model.noise_scheduler().add_noise(fixed["images"], noise, timesteps)
            eps = model.predict_noise(noisy, timesteps, system.text_embeddings(fixed["captions"]), fixed["camera"], 4)
        return torch.nn.functional.mse_loss(eps, noise).item()

    before = fixed_loss()
    trainer = quick_trainer(30)
    trainer.fit(system, datamodule=datamodule)
    after = fixed_loss()
    assert after < 0.7 * before, (before, after)
    # The cosine decay from step 20 ends at min_lr_ratio * lr at max_steps.
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.2 * 3e-3)
    # Validation grid (2 captions x 4 views of 16 px, 2 px padding) and the exported EMA model.
    grids = list((tmp_path / "trial" / "save").glob("it30-val.png"))
    assert len(grids) == 1
    exported = MultiViewDiffusionModel.from_pretrained(tmp_path / "trial" / "model")
    for name, value in exported.unet.state_dict().items():
        assert torch.equal(value, system.ema_model.unet.state_dict()[name]), name


@pytest.mark.slow
def test_ddp_two_cpu_processes_through_launch(tmp_path: Path) -> None:
    """launch.py with Lightning DDP (gloo) on 2 CPU processes: trains, checkpoints, exports the EMA model."""
    from omegaconf import OmegaConf

    root = write_fake_dataset(tmp_path / "data")
    config = {
        "name": "ddp", "tag": "test", "exp_root_dir": str(tmp_path / "outputs"), "use_timestamp": False,
        "data_type": "procedural-multiview-datamodule",
        "data": {"root": str(root), "batch_size": 2, "single_view_prob": 0.3, "val_num_captions": 2},
        "system_type": "mvdiffusion-train-system",
        "system": {**tiny_system_config(tmp_path), "export_every_n_steps": 3},
        "trainer": {"max_steps": 4, "val_check_interval": 4, "limit_val_batches": 1},
        "checkpoint": {"every_n_train_steps": 4},
    }
    OmegaConf.save(OmegaConf.create(config), tmp_path / "ddp.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    completed = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), "--config", str(tmp_path / "ddp.yaml"), "--train",
         "trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    trial = tmp_path / "outputs" / "ddp" / "test"
    checkpoint = torch.load(trial / "ckpts" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 4
    assert (trial / "save" / "it4-val.png").is_file()
    exported = MultiViewDiffusionModel.from_pretrained(trial / "model")
    ema_state = {k[len("ema.module.unet."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("ema.module.unet.")}
    for name, value in exported.unet.state_dict().items():
        assert torch.equal(value, ema_state[name]), name
