"""MVDreamBooth: the preservation term, fine-tuning a tiny model on a subject, the 3D-stage chain."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from threestudio_mv.data.subject_images import SubjectImagesDataModule
from threestudio_mv.models.mvdiffusion.model import ModelMetadata, MultiViewDiffusionModel
from threestudio_mv.models.mvdiffusion.unet import unet_config
from threestudio_mv.systems.mvdreambooth import MVDreamBoothSystem, preservation_loss
from threestudio_mv.utils.errors import UserError

from test_subject_images import write_views

REPO = Path(__file__).resolve().parents[1]
TEXT = {"type": "learned", "words": ["a", "sks", "toy", "red", "cube"], "dim": 32, "max_length": 6}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; two threads on a busy 2-core machine run ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model_folder(path: Path) -> Path:
    config = unet_config(
        sample_size=16, block_out_channels=[16, 32], attention_levels=[False, True], cross_attention_dim=32, norm_num_groups=8
    )
    return MultiViewDiffusionModel.create(config, TEXT, ModelMetadata(image_size=16)).save_pretrained(path)


def folder_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def system_config(model: Path, **options) -> dict:
    return {
        "pretrained_model_name_or_path": str(model),
        "class_word": "toy",
        "optimizer": {"name": "AdamW", "args": {"lr": 2e-3}},
        "warmup_steps": 1,
        "val_inference_steps": 2,
        **options,
    }


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_preservation_is_zero_at_theta0_and_grows_with_distance(norm: str) -> None:
    anchors = [torch.randn(5, 3), torch.randn(7)]
    assert preservation_loss([a.clone() for a in anchors], anchors, norm).item() == 0.0
    direction = [torch.randn_like(a) for a in anchors]
    values = [preservation_loss([a + s * d for a, d in zip(anchors, direction)], anchors, norm).item() for s in (0.1, 0.5, 2.0)]
    assert 0.0 < values[0] < values[1] < values[2]
    # ||theta - theta_0|| / N with N = 22 parameters: sum |d| / N, or sum d^2 / N.
    moved = [a + 0.5 for a in anchors]
    expected = 0.5 if norm == "l1" else 0.25
    assert preservation_loss(moved, anchors, norm).item() == pytest.approx(expected)


def test_preservation_gradient_pulls_back_to_theta0() -> None:
    anchor = torch.zeros(4)
    theta = torch.tensor([1.0, -2.0, 0.5, 0.0], requires_grad=True)
    preservation_loss([theta], [anchor], "l2").backward()
    assert torch.allclose(theta.grad, 2.0 * theta.detach() / 4)
    with pytest.raises(UserError, match="preservation_norm"):
        preservation_loss([theta], [anchor], "l3")


def test_bad_system_options_are_user_errors(tmp_path: Path) -> None:
    model = tiny_model_folder(tmp_path / "base")
    with pytest.raises(UserError, match="system.class_word"):
        MVDreamBoothSystem(system_config(model, class_word=""), trial_dir=str(tmp_path / "trial"))
    with pytest.raises(UserError, match="system.preservation_norm"):
        MVDreamBoothSystem(system_config(model, preservation_norm="l3"), trial_dir=str(tmp_path / "trial"))
    with pytest.raises(UserError, match="system.stage_3d_config"):
        MVDreamBoothSystem(system_config(model, run_3d_stage=True, stage_3d_config=str(tmp_path / "no.yaml")), trial_dir=str(tmp_path / "t"))


def test_tiny_fine_tune_learns_the_subject_and_keeps_the_base_model(tmp_path: Path, quick_trainer) -> None:
    base = tiny_model_folder(tmp_path / "base")
    before_hash = folder_hash(base)
    write_views(tmp_path / "subject", n_views=8, size=16, posed=True)
    datamodule = SubjectImagesDataModule({"image_dir": str(tmp_path / "subject"), "image_size": 16, "batch_size": 8})
    system = MVDreamBoothSystem(system_config(base, lambda_preservation=10.0), trial_dir=str(tmp_path / "trial"))
    assert system.subject_prompt == "a sks toy"
    datamodule.setup("fit")
    fixed = datamodule.train_set[0]
    assert fixed["num_views"] == 4
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn((4, *fixed["images"].shape), generator=generator)
    timesteps = torch.randint(50, 1000, (4, fixed["images"].shape[0]), generator=generator)

    def subject_loss() -> float:
        """Epsilon MSE on the subject's views over 4 fixed (noise, timestep) draws."""
        model = system.model
        embeddings = system.text_embeddings([system.subject_prompt] * fixed["images"].shape[0])
        losses = []
        with torch.no_grad():
            for draw in range(4):
                noisy = model.noise_scheduler().add_noise(fixed["images"], noise[draw], timesteps[draw])
                eps = model.predict_noise(noisy, timesteps[draw], embeddings, fixed["camera"], 4)
                losses.append(torch.nn.functional.mse_loss(eps, noise[draw]).item())
        return sum(losses) / len(losses)

    before = subject_loss()
    trainer = quick_trainer(40)
    trainer.fit(system, datamodule=datamodule)
    after = subject_loss()
    assert after < 0.8 * before, (before, after)
    assert system.preservation().item() > 0.0
    # The base folder is untouched; the personalised model is a new folder in the trial.
    assert folder_hash(base) == before_hash
    tuned = MultiViewDiffusionModel.from_pretrained(tmp_path / "trial" / "model")
    base_model = MultiViewDiffusionModel.from_pretrained(base)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.unet.parameters(), base_model.unet.parameters()))
    for name, value in tuned.unet.state_dict().items():
        assert torch.equal(value, system.model.unet.state_dict()[name]), name
    assert (tmp_path / "trial" / "save" / "subject.png").is_file()
    assert (tmp_path / "trial" / "save" / "it40-val.png").is_file()


def test_stage_3d_command_uses_the_personalised_model(tmp_path: Path) -> None:
    model = tiny_model_folder(tmp_path / "base")
    system = MVDreamBoothSystem(
        system_config(model, run_3d_stage=True, identifier="zxq", stage_3d_overrides=["trainer.max_steps=3"]),
        trial_dir=str(tmp_path / "trial"),
    )
    command = system.stage_3d_command()
    assert command[1:3] == ["-m", "threestudio_mv.launch"]
    assert str(REPO / "threestudio_mv" / "configs" / "mvdream.yaml") in command
    assert f"system.guidance.pretrained_model_name_or_path={tmp_path / 'trial' / 'model'}" in command
    assert "system.prompt_processor.prompt=a zxq toy" in command
    assert f"exp_root_dir={tmp_path / 'trial'}" in command and "name=3d" in command and "tag=a_zxq_toy" in command
    assert command[-1] == "trainer.max_steps=3" and {"--train", "--export", "--test"} <= set(command)


def test_launch_chains_fine_tune_and_3d_stage(tmp_path: Path) -> None:
    """launch.py: fine-tune a tiny model on a mesh subject, then text-to-3D with it, in one command."""
    import trimesh

    base = tiny_model_folder(tmp_path / "base")
    mesh = trimesh.creation.icosphere(subdivisions=2)
    mesh.export(tmp_path / "ball.obj")
    config = OmegaConf.load(REPO / "configs" / "mvdreambooth.yaml")
    config.merge_with({"exp_root_dir": str(tmp_path / "outputs"), "use_timestamp": False, "tag": "ball"})
    OmegaConf.save(config, tmp_path / "db.yaml")
    stage_overrides = (
        "[trainer.max_steps=4,trainer.val_check_interval=4,checkpoint.every_n_train_steps=4,data.n_test_views=2,"
        "system.geometry.isosurface_resolution=32,system.exporter.texture_size=64,data.eval_height=32,data.eval_width=32]"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    completed = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), "--config", str(tmp_path / "db.yaml"), "--train",
         f"data.image_dir={tmp_path / 'ball.obj'}", "data.image_size=16", "data.mesh_color=red",
         f"system.pretrained_model_name_or_path={base}", "system.class_word=ball", "system.run_3d_stage=true",
         f"system.stage_3d_overrides={stage_overrides}", "trainer.max_steps=3", "trainer.val_check_interval=3",
         "checkpoint.every_n_train_steps=3", "system.val_inference_steps=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    trial = tmp_path / "outputs" / "mvdreambooth" / "ball"
    stage_3d = trial / "3d" / "a_sks_ball"
    assert f"3D stage trial folder: {stage_3d}" in completed.stdout
    assert (trial / "model" / "model_index.json").is_file()
    assert (stage_3d / "texture" / "save" / "it4-export" / "model.obj").is_file()  # the staged default's last stage
    parsed = OmegaConf.load(stage_3d / "texture" / "configs" / "parsed.yaml")
    assert parsed.system.guidance.pretrained_model_name_or_path == str(trial / "model")
    assert parsed.system.prompt_processor.prompt == "a sks ball"


def test_builtin_eval_subjects_are_outside_the_vocabulary() -> None:
    from threestudio_mv.eval.dreambooth_eval import build_subject, ice_cream_asset, is_in_vocabulary, dumbbell_asset

    assert is_in_vocabulary("a red cube on top of a blue cylinder")
    for asset in (ice_cream_asset(), dumbbell_asset()):
        assert not is_in_vocabulary(asset.caption)
        lo, hi = asset.bounds()
        assert (lo >= -0.5).all() and (hi <= 0.5).all() and float((hi - lo).max()) > 0.8
    with pytest.raises(UserError, match="FILE:COLOUR:CLASS WORD"):
        build_subject("dog.obj:brown", Path("."))


def test_photo_subject_is_four_unposed_jpegs_the_subject_loader_masks(tmp_path: Path) -> None:
    from PIL import Image

    from threestudio_mv.data.subject_images import SubjectImagesConfig, load_subject
    from threestudio_mv.eval.dreambooth_eval import build_subject, write_photos

    folder = write_photos(build_subject("photos", Path(".")).subject, tmp_path / "photos")
    photos = sorted(folder.iterdir())
    assert [p.suffix for p in photos] == [".jpg"] * 4 and not (folder / "transforms.json").exists()
    assert len({Image.open(p).size for p in photos}) > 1  # each its own size
    loaded = load_subject(str(folder), SubjectImagesConfig(image_size=32))
    assert loaded.mode == "multi-view + single views" and loaded.unposed == [0, 1, 2, 3]  # + hull views
    coverage = loaded.alpha[:4].mean(dim=(1, 2))
    assert ((coverage > 0.05) & (coverage < 0.6)).all()  # masked from white and re-framed


def test_subject_scores_find_the_turn_of_a_turned_result() -> None:
    from threestudio_mv.eval.dreambooth_eval import build_subject
    from threestudio_mv.eval.subjects import procedural_subject, subject_scores, turned

    chair = procedural_subject("a blue chair with gray legs")
    result = turned(chair.mesh, 90.0)
    straight = subject_scores(result, chair)
    best = subject_scores(result, chair, turns=4)
    assert best["turn_deg"] == 270.0 and best["iou"] > 0.95 > straight["iou"] + 0.2
    assert build_subject("procedural", Path(".")).given == "views"


@pytest.mark.slow
def test_eval_cli_runs_all_arms_and_scores_them(tmp_path: Path) -> None:
    """dreambooth_eval end to end on a tiny random model with a few steps (plumbing, not quality)."""
    import json

    base = tiny_model_folder(tmp_path / "base")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    completed = subprocess.run(
        [sys.executable, "-m", "threestudio_mv.eval.dreambooth_eval", "--out", str(tmp_path / "eval"), "--model", str(base),
         "--subjects", "photos", "--num-preservation", "2", "--finetune", "trainer.max_steps=3", "--stage-3d",
         "trainer.max_steps=4", "trainer.val_check_interval=4", "checkpoint.every_n_train_steps=4", "data.n_test_views=2",
         "system.geometry.isosurface_resolution=32", "system.exporter.texture_size=64"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    row = results["rows"]["photos"]
    assert row["in_vocabulary"] is False and row["prompt"] == "a sks dumbbell" and row["given"] == "photos"
    for arm in ("personalised", "base, same prompt", "base, class word"):
        scores = row[arm]
        assert 0.0 <= scores["iou"] <= 1.0
        assert (scores["export"] is None and scores["delta_e"] is None) or scores["delta_e"] > 0.0
    assert set(row["runs"]) == {"personalised", "base, same prompt", "base, class word"}
    assert set(results["preservation"]["base"]["per_caption"]) == set(results["preservation"]["captions"])
    assert "photos: silhouette_iou_drop" in results["preservation"]
    assert (tmp_path / "eval" / "photos" / "views.png").is_file() and (tmp_path / "eval" / "sheet.png").is_file()
    assert results["summary"]["subjects"] == ["photos"]



def test_eval_reuse_runs_only_what_is_missing(tmp_path: Path, monkeypatch) -> None:
    """--reuse: a fine-tuned model is not fine-tuned again (only its 3D stage runs), a staged trial with
    finished stages resumes, a trial with an export is not rerun, and a resumed run's seconds are not the job's."""
    from threestudio_mv.eval import dreambooth_eval as db

    item = db.build_subject("procedural", tmp_path)
    root, prompt, base = tmp_path / "eval" / "procedural", "a sks ice cream", tmp_path / "base-model"
    tuned = root / "personalised" / "subject"
    (tuned / "model").mkdir(parents=True)
    (tuned / "model" / "model_index.json").write_text("{}")
    (tuned / "3d" / "a_sks_ice_cream" / "coarse" / "ckpts").mkdir(parents=True)
    (tuned / "3d" / "a_sks_ice_cream" / "coarse" / "ckpts" / "last.ckpt").write_bytes(b"")
    export = root / "base" / "a_ice_cream" / "texture" / "save" / "it150-export"
    export.mkdir(parents=True)
    (export / "model.obj").write_text("")
    launched = {}
    monkeypatch.setattr(db, "run_launch", lambda arguments, log, threads: launched.setdefault(log.name, arguments) and {"seconds": 1.0})
    args = db.parse_args(["--out", str(tmp_path / "eval"), "--reuse", "--stage-3d", "data.n_test_views=8"])
    arms = db.subject_arms(item, root, prompt, args, base, 32, 1)
    assert arms["base, class word"][1] is None  # finished: reused
    for arm in ("personalised", "base, same prompt"):
        arms[arm][1]()
    personalised = launched["personalised.log"]
    assert "configs/mvdream.yaml" in personalised[1] and "system.run_3d_stage=true" not in personalised
    assert f"system.guidance.pretrained_model_name_or_path={tuned / 'model'}" in personalised
    assert f"resume={tuned / '3d' / 'a_sks_ice_cream'}" in personalised and "data.n_test_views=8" in personalised
    assert not any(argument.startswith("resume=") for argument in launched["base_same_prompt.log"])
    rows = {"procedural": {"runs": {"personalised": {"seconds": 30.0, "resumed": True}}}}
    assert db.whole_job_seconds(rows["procedural"]) is None


def test_view_consistency_score_finds_the_subjects_turn_and_rejects_one_side_everywhere() -> None:
    from threestudio_mv.eval.dreambooth_eval import build_subject
    from threestudio_mv.eval.dreambooth_views import best_turn_iou
    from threestudio_mv.utils.camera import view_group

    subject = build_subject("photos", Path("unused")).subject  # the dumbbell: its side and end views differ
    size, elevation, fovy = 32, 15.0, 40.0
    turned = view_group(4, elevation, 30.0 + 45.0, fovy)  # the subject turned by 45 degrees, from orbit start 30
    masks = list(subject.render(turned["c2w"], turned["fovy"], size)[..., 3].numpy() > 0.5)
    consistent = best_turn_iou(masks, subject, elevation, 30.0, fovy)
    assert consistent["iou"] > 0.95 and consistent["turn_deg"] == 45.0
    same_side = best_turn_iou([masks[1]] * 4, subject, elevation, 30.0, fovy)  # one side drawn from every camera
    assert same_side["iou"] < consistent["iou"] - 0.2
