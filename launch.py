#!/usr/bin/env python
"""The one CLI of threestudio-mv.

    python launch.py --config configs/mvdream.yaml --train --export system.prompt_processor.prompt="a blue mug"
    python launch.py --config configs/reconstruction.yaml --train data.root=DIR
    python launch.py --export resume=outputs/<name>/<tag>/ckpts/last.ckpt   # export a finished trial
    python launch.py --config ... --train resume=outputs/<name>/<tag>/ckpts/last.ckpt   # continue a trial

Any config key can be overridden with key=value (OmegaConf dot-list syntax). User mistakes print one
line and exit with code 2.
"""
import argparse
import importlib
import logging
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

REPO_ROOT = Path(__file__).resolve().parent
EXTENSIONS_DIR = REPO_ROOT / "extensions"


@dataclass
class TrainerConfig:
    """Subset of Lightning Trainer arguments a trial may set."""

    max_steps: int = 1000
    log_every_n_steps: int = 10
    val_check_interval: Optional[int] = 200
    num_sanity_val_steps: int = 0
    precision: str = "32-true"
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    gradient_clip_val: Optional[float] = None
    enable_progress_bar: bool = True
    limit_val_batches: Optional[float] = None


@dataclass
class CheckpointConfig:
    every_n_train_steps: int = 0
    save_last: bool = True
    save_top_k: int = -1


@dataclass
class TrialConfig:
    """Top-level keys of a trial config (DESIGN.md section 3)."""

    name: str = "default"
    description: str = ""
    tag: str = ""
    exp_root_dir: str = "outputs"
    use_timestamp: bool = True
    seed: int = 0
    resume: Optional[str] = None
    data_type: str = ""
    data: Dict[str, Any] = field(default_factory=dict)
    system_type: str = ""
    system: Dict[str, Any] = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def parse_args(argv: List[str]) -> Tuple[argparse.Namespace, List[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="path to a trial YAML (optional with resume=, which reuses the trial's)")
    modes = parser.add_argument_group("modes (combine --train with --export / --test)")
    modes.add_argument("--train", action="store_true")
    modes.add_argument("--validate", action="store_true")
    modes.add_argument("--test", action="store_true")
    modes.add_argument("--export", action="store_true")
    parser.add_argument("--gpu", default=None, help="GPU index(es), e.g. 0 or 0,1; falls back to CPU without CUDA")
    parser.add_argument("--verbose", action="store_true", help="show library warnings and info logs")
    args, extras = parser.parse_known_args(argv)
    from threestudio_mv.utils.errors import UserError

    for extra in extras:
        if "=" not in extra or extra.startswith("-"):
            raise UserError(f"unrecognised argument '{extra}'; overrides look like key=value, see --help")
    if not (args.train or args.validate or args.test or args.export):
        raise UserError("choose what to do: --train, --validate, --test and/or --export")
    return args, extras


def import_extensions() -> None:
    """Import every package under extensions/ so their modules register themselves."""
    if not EXTENSIONS_DIR.is_dir():
        return
    sys.path.insert(0, str(EXTENSIONS_DIR))
    for child in sorted(EXTENSIONS_DIR.iterdir()):
        if (child / "__init__.py").exists():
            importlib.import_module(child.name)


def load_yaml_with_extends(path: Path, seen: Tuple[Path, ...] = ()):
    """Load a trial YAML; a top-level ``extends: other.yaml`` (relative to the file) is merged under it."""
    from omegaconf import OmegaConf

    from threestudio_mv.utils.errors import UserError

    path = path.resolve()
    if path in seen:
        raise UserError(f"config '{path}' extends itself (cycle: {' -> '.join(str(p) for p in seen)})")
    if not path.is_file():
        raise UserError(f"config file '{path}' not found")
    config = OmegaConf.load(path)
    base = config.pop("extends", None)
    if base is None:
        return config
    return OmegaConf.merge(load_yaml_with_extends(path.parent / str(base), seen + (path,)), config)


def load_config(args: argparse.Namespace, overrides: List[str]):
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from threestudio_mv.utils.errors import UserError

    try:
        cli = OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as error:
        raise UserError(f"bad override in {' '.join(overrides)}: {str(error).splitlines()[0]}") from None
    config_path = args.config
    if config_path is None:
        resume = cli.get("resume")
        if not resume:
            raise UserError("--config is required (or pass resume=<trial>/ckpts/last.ckpt to reuse a trial's config)")
        config_path = str(Path(resume).resolve().parent.parent / "configs" / "raw.yaml")
    path = Path(config_path)
    if not path.is_file():
        raise UserError(f"config file '{config_path}' not found")
    try:
        raw = OmegaConf.merge(load_yaml_with_extends(path), cli)
    except OmegaConfBaseException as error:
        raise UserError(f"cannot read config '{config_path}': {str(error).splitlines()[0]}") from None
    return raw


def trial_tag(cfg: Any) -> str:
    if cfg.tag:
        return cfg.tag
    prompt = (cfg.system.get("prompt_processor") or {}).get("prompt") if isinstance(cfg.system, dict) else None
    source = prompt or Path(str(cfg.data.get("root", "") or "")).name or "default"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", source.strip()).strip("_")[:80] or "default"


def resolve_trial_dir(cfg: Any) -> Path:
    if cfg.resume:
        ckpt = Path(cfg.resume).resolve()
        return ckpt.parent.parent
    tag = trial_tag(cfg)
    if cfg.use_timestamp:
        tag += time.strftime("@%Y%m%d-%H%M%S")
    return Path(cfg.exp_root_dir).resolve() / cfg.name / tag


def accelerator_settings(args: argparse.Namespace, trainer_cfg: TrainerConfig) -> Dict[str, Any]:
    import torch

    if args.gpu is not None:
        if torch.cuda.is_available():
            return {"accelerator": "gpu", "devices": [int(g) for g in str(args.gpu).split(",")]}
        logging.getLogger("threestudio_mv").warning("--gpu given but CUDA is not available: running on CPU")
        return {"accelerator": "cpu", "devices": trainer_cfg.devices if trainer_cfg.accelerator == "cpu" else 1}
    return {"accelerator": trainer_cfg.accelerator, "devices": trainer_cfg.devices}


def quiet_libraries() -> None:
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", module="lightning_fabric")
    warnings.filterwarnings("ignore", category=UserWarning, message=".*does not have many workers.*")
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: List[str]) -> int:
    from threestudio_mv.utils.errors import UserError

    args, overrides = parse_args(argv)
    if not args.verbose:
        quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")

    from omegaconf import OmegaConf

    import threestudio_mv
    from threestudio_mv.utils.config import config_to_dict, parse_structured, to_container

    import_extensions()
    raw = load_config(args, overrides)
    cfg: TrialConfig = parse_structured(TrialConfig, raw)
    if not cfg.system_type:
        raise UserError("config key 'system_type' is empty; set it to a registered system, e.g. mvdream-system")
    if not cfg.data_type:
        raise UserError("config key 'data_type' is empty; set it to a registered data module")
    if cfg.resume and not Path(cfg.resume).is_file():
        raise UserError(f"checkpoint '{cfg.resume}' not found (resume= must point to a .ckpt file)")
    if (args.test or args.validate or args.export) and not args.train and not cfg.resume:
        raise UserError("--test/--validate/--export without --train need a trained trial: pass resume=<trial>/ckpts/last.ckpt")

    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    from threestudio_mv.utils.trainer import AtomicCheckpointIO, StepProgressBar

    trial_dir = resolve_trial_dir(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    system_cls, data_cls = threestudio_mv.find(cfg.system_type), threestudio_mv.find(cfg.data_type)
    datamodule = data_cls(cfg.data)
    system = system_cls(cfg.system, trial_dir=str(trial_dir))

    is_rank_zero = int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0
    if is_rank_zero and args.train:
        (trial_dir / "configs").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(raw, trial_dir / "configs" / "raw.yaml")
        parsed = config_to_dict(cfg)
        parsed["system"] = config_to_dict(system.cfg)
        if hasattr(datamodule, "cfg"):
            parsed["data"] = config_to_dict(datamodule.cfg)
        OmegaConf.save(OmegaConf.create(parsed), trial_dir / "configs" / "parsed.yaml")
        with open(trial_dir / "cmd.txt", "a") as handle:
            handle.write(" ".join(shlex.quote(a) for a in [sys.executable, "launch.py", *argv]) + "\n")

    trainer_cfg = cfg.trainer
    callbacks: List[Any] = [StepProgressBar(refresh_rate=1)] if trainer_cfg.enable_progress_bar else []
    if args.train:
        callbacks.append(
            ModelCheckpoint(
                dirpath=trial_dir / "ckpts",
                filename="step{step:06d}",
                auto_insert_metric_name=False,
                enable_version_counter=False,  # a resumed trial keeps writing ckpts/last.ckpt
                save_last=cfg.checkpoint.save_last,
                save_top_k=cfg.checkpoint.save_top_k,
                every_n_train_steps=cfg.checkpoint.every_n_train_steps or trainer_cfg.max_steps,
            )
        )
    trainer = pl.Trainer(
        max_steps=trainer_cfg.max_steps,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        val_check_interval=trainer_cfg.val_check_interval,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=trainer_cfg.num_sanity_val_steps,
        precision=trainer_cfg.precision,
        num_nodes=trainer_cfg.num_nodes,
        strategy=trainer_cfg.strategy,
        gradient_clip_val=trainer_cfg.gradient_clip_val,
        enable_progress_bar=trainer_cfg.enable_progress_bar,
        limit_val_batches=trainer_cfg.limit_val_batches,
        # no_grad rather than inference_mode in val/test: analytic normals need autograd there
        inference_mode=False,
        callbacks=callbacks,
        # One CSV per run of the trial, so a resumed run never overwrites the earlier loss history.
        logger=[
            TensorBoardLogger(trial_dir, name="tb_logs", version=""),
            CSVLogger(trial_dir, name="csv_logs", version=time.strftime("run-%Y%m%d-%H%M%S")),
        ],
        plugins=[AtomicCheckpointIO()],
        enable_model_summary=False,
        default_root_dir=trial_dir,
        **accelerator_settings(args, trainer_cfg),
    )

    if args.train:
        trainer.fit(system, datamodule=datamodule, ckpt_path=cfg.resume)
    elif cfg.resume:
        system.load_trained(cfg.resume)
    if args.validate:
        trainer.validate(system, datamodule=datamodule)
    if args.test:
        trainer.test(system, datamodule=datamodule)
    if args.export and trainer.is_global_zero:
        outputs = system.export()
        for name, path in outputs.items():
            print(f"exported {name}: {path}")
    if trainer.is_global_zero:
        print(f"trial folder: {trial_dir}")
    return 0


if __name__ == "__main__":
    from threestudio_mv.utils.errors import exit_on_user_error

    sys.exit(exit_on_user_error(main)(sys.argv[1:]))
