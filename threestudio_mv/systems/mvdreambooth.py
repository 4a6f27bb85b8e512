"""System `mvdreambooth-system`: MVDreamBooth (MVDream paper, section 3.3).

Stage 1 fine-tunes a copy of a multi-view diffusion model (default: the bundled one) on a few images
of one subject (``subject-images-datamodule``) under the prompt "a {identifier} {class_word}":

    loss = diffusion loss + lambda_preservation * ||theta - theta_0|| / N

where theta_0 is a frozen copy of the starting weights and N their count; the weight penalty stands in
for DreamBooth's class-prior images and keeps the multi-view prior. The fine-tuned model is saved to
``<trial>/model/`` (atomically; the starting folder is never written).

Stage 2 (``run_3d_stage: true``) then runs text-to-3D (``stage_3d_config``, default
configs/mvdream.yaml) through launch.py with the personalised model as guidance and the subject
prompt; its trial goes to ``<trial>/3d/<prompt>/`` (printed, and recorded in the trial's
metrics.json as ``stage_3d_trial``).

    python launch.py --config configs/mvdreambooth.yaml --train data.image_dir=DIR \
        system.identifier=sks system.class_word=mug [system.run_3d_stage=true]
"""
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from torch import Tensor

from threestudio_mv import register
from threestudio_mv.models.mvdiffusion.model import DEFAULT_MODEL_PATH
from threestudio_mv.systems.base import OptimizerConfig
from threestudio_mv.systems.mvdiffusion_train import MVDiffusionTrainSystem
from threestudio_mv.utils.camera import view_group
from threestudio_mv.utils.errors import UserError
from threestudio_mv.utils.io import image_grid
from threestudio_mv.utils.trial import launch_command, run_trial, slug

DEFAULT_STAGE_3D_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mvdream.yaml"
PRESERVATION_NORMS = ("l1", "l2")


def preservation_loss(parameters: Sequence[Tensor], anchors: Sequence[Tensor], norm: str) -> Tensor:
    """||theta - theta_0|| / N over all ``parameters`` against their ``anchors`` (same shapes).

    ``"l1"``: sum |theta - theta_0| / N. ``"l2"``: sum (theta - theta_0)^2 / N, the squared norm, whose
    gradient 2 (theta - theta_0) / N is defined at theta_0 (the plain norm's is not).
    """
    if norm not in PRESERVATION_NORMS:
        raise UserError(f"config key 'system.preservation_norm' must be one of {', '.join(PRESERVATION_NORMS)}, got '{norm}'")
    total = parameters[0].new_zeros(())
    count = 0
    for parameter, anchor in zip(parameters, anchors):
        difference = parameter - anchor.to(parameter.device)
        total = total + (difference.abs().sum() if norm == "l1" else difference.square().sum())
        count += parameter.numel()
    return total / max(count, 1)


@register("mvdreambooth-system")
class MVDreamBoothSystem(MVDiffusionTrainSystem):
    """Fine-tunes a multi-view diffusion model on one subject, then (optionally) runs text-to-3D."""

    @dataclass
    class Config(MVDiffusionTrainSystem.Config):
        pretrained_model_name_or_path: Optional[str] = None  # model folder to personalise; None: the bundled one
        identifier: str = "sks"  # the rare word that names the subject
        class_word: str = ""  # required: what the subject is ("mug", "teddy bear")
        prompt: Optional[str] = None  # None: "a {identifier} {class_word}" (the model's suffix is added)
        lambda_preservation: float = 10.0  # lambda/N ~ the median diffusion gradient of the tiny model
        preservation_norm: str = "l1"  # l1 | l2 (squared)
        val_captions: List[str] = field(default_factory=list)  # shown under the subject in validation grids
        optimizer: OptimizerConfig = field(
            default_factory=lambda: OptimizerConfig(name="AdamW", args={"lr": 1e-4, "betas": [0.9, 0.999], "weight_decay": 0.0})
        )
        warmup_steps: int = 10
        cond_drop_prob: float = 0.0  # keep the unconditional branch generic for CFG
        ema_decay: float = 0.0  # fine-tunes are short: export the weights themselves
        export_every_n_steps: int = 0
        val_inference_steps: int = 25
        # Stage 2: text-to-3D with the personalised model
        run_3d_stage: bool = False
        stage_3d_config: Optional[str] = None  # None: configs/mvdream.yaml of this repository
        stage_3d_overrides: List[str] = field(default_factory=list)  # key=value for the 3D trial
        stage_3d_test: bool = True  # also render the 3D trial's test turntable

    cfg: Config

    def configure(self) -> None:
        cfg = self.cfg
        for key in ("identifier", "class_word"):
            if not getattr(cfg, key).strip() and cfg.prompt is None:
                example = "sks" if key == "identifier" else "mug"
                raise UserError(f"config key 'system.{key}' is empty; name the subject, e.g. system.{key}={example}")
        if cfg.preservation_norm not in PRESERVATION_NORMS:
            raise UserError(
                f"config key 'system.preservation_norm' must be one of {', '.join(PRESERVATION_NORMS)}, got '{cfg.preservation_norm}'"
            )
        if cfg.run_3d_stage and not self.stage_3d_config.is_file():
            raise UserError(f"config key 'system.stage_3d_config': '{self.stage_3d_config}' not found")
        for override in cfg.stage_3d_overrides:
            if "=" not in override:
                raise UserError(f"config key 'system.stage_3d_overrides': '{override}' is not key=value")
        if not cfg.pretrained_model_name_or_path:
            cfg.pretrained_model_name_or_path = str(DEFAULT_MODEL_PATH)
        super().configure()
        # theta_0: a frozen copy of the starting weights; a plain list, so not in checkpoints (a resumed
        # trial rebuilds it from the same model folder).
        self._anchors = [p.detach().clone() for p in self.tuned_parameters()]
        self.num_tuned_parameters = sum(p.numel() for p in self._anchors)

    @property
    def subject_prompt(self) -> str:
        """The prompt that names the subject (without the model's suffix)."""
        if self.cfg.prompt is not None:
            return self.cfg.prompt
        return f"a {self.cfg.identifier.strip()} {self.cfg.class_word.strip()}"

    @property
    def stage_3d_config(self) -> Path:
        return Path(self.cfg.stage_3d_config).expanduser() if self.cfg.stage_3d_config else DEFAULT_STAGE_3D_CONFIG

    def tuned_parameters(self) -> List[Tensor]:
        """The parameters being fine-tuned (UNet, and a learned text encoder if the model has one)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def preservation(self) -> Tensor:
        """||theta - theta_0|| / N of the current weights."""
        return preservation_loss(self.tuned_parameters(), self._anchors, self.cfg.preservation_norm)

    # ----------------------------------------------------------------------------- training
    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        subject = getattr(datamodule, "subject", None)
        size = self.model.metadata.image_size
        if subject is not None and subject.rgb.shape[1] != size:
            raise UserError(f"data.image_size={subject.rgb.shape[1]} but the model works at {size} px; set data.image_size={size}")
        self._anchors = [anchor.to(self.device) for anchor in self._anchors]
        if self.text_cache is not None:
            self.text_cache.encode(self._with_suffix([self.subject_prompt, *self.cfg.val_captions]) + [""])
        if subject is not None and self.trainer.is_global_zero:
            self.save_subject_sheet(subject)
            print(f"subject: {len(subject.names)} images ({subject.source}), {subject.mode} training, prompt '{self.subject_prompt}'")

    def save_subject_sheet(self, subject: Any) -> Optional[Path]:
        """``save/subject.png``: the training images, one row per 4-view group, then the single views."""
        scale = max(1, 96 // int(subject.rgb.shape[1]))  # nearest-neighbour upscale, to be seen
        images = subject.rgb.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
        rows = [[images[i] for i in group] for group in subject.groups]
        singles = subject.singles
        rows += [[images[i] for i in singles[start : start + 4]] for start in range(0, len(singles), 4)]
        return self.save_image("subject.png", image_grid(rows))

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> Tensor:
        batch = {**batch, "captions": [self.subject_prompt] * int(batch["images"].shape[0])}
        diffusion = super().training_step(batch, batch_idx)
        preservation = self.preservation()
        loss = diffusion + self.cfg.lambda_preservation * preservation
        self.log("train/loss_preservation", preservation)
        self.log("train/loss_total", loss)
        return loss

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        """A grid of DDIM samples: the subject prompt, then ``val_captions``, 4 views each."""
        meta = self.model.metadata
        views = view_group(meta.n_view, meta.default_elevation, 0.0, meta.default_fovy, meta.relative_distance)
        captions = [self.subject_prompt, *self.cfg.val_captions]
        grid_batch = {
            "captions": [caption for caption in captions for _ in range(meta.n_view)],
            "c2w": views["c2w"].repeat(len(captions), 1, 1).to(self.device),
            "num_views": meta.n_view,
        }
        super().validation_step(grid_batch, batch_idx)

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.cfg.run_3d_stage and self.is_global_zero:
            self.run_3d_stage()

    # ----------------------------------------------------------------------------- stage 2
    def stage_3d_command(self) -> List[str]:
        """The CLI's command line for text-to-3D with the personalised model."""
        modes = ["--train", "--export"] + (["--test"] if self.cfg.stage_3d_test else [])
        return launch_command(
            "--config", str(self.stage_3d_config), *modes,
            f"system.guidance.pretrained_model_name_or_path={self.trial_dir / 'model'}",
            f"system.prompt_processor.prompt={self.subject_prompt}",
            f"exp_root_dir={self.trial_dir}", "name=3d", f"tag={slug(self.subject_prompt)}", "use_timestamp=false",
            *self.cfg.stage_3d_overrides,
        )

    def run_3d_stage(self) -> Path:
        """Run the 3D stage in a CLI subprocess; returns (and prints) its trial folder."""
        command = self.stage_3d_command()
        print("3D stage:", shlex.join(command), flush=True)
        # stdout is captured to find the trial folder the CLI prints; progress bars (stderr) show live.
        run = run_trial(command[3:], stderr=None)
        print(run.stdout, end="", flush=True)
        if run.returncode != 0:
            raise UserError(f"the 3D stage failed (exit code {run.returncode}, see above); rerun it with: {shlex.join(command)}")
        trial = run.trial_dir or self.trial_dir / "3d" / slug(self.subject_prompt)
        self.save_metrics({"stage_3d_trial": str(trial), "stage_3d_command": shlex.join(command)})
        print(f"3D stage trial folder: {trial}", flush=True)
        return trial
