"""The one CLI of threestudio-mv (``threestudio-mv`` once installed; ``python launch.py`` in a checkout).

    threestudio-mv --config mvdream --train --export system.prompt_processor.prompt="a blue mug"
    threestudio-mv --config configs/reconstruction.yaml --train data.root=DIR
    threestudio-mv --export resume=outputs/<name>/<tag>@<time>/ckpts/last.ckpt   # export a finished trial
    threestudio-mv --train resume=outputs/<name>/<tag>@<time>/ckpts/last.ckpt   # continue a trial (its own config)

``--config`` takes a YAML path or the name of a bundled config (``mvdream``, ``reconstruction``, ...).
Any config key can be overridden with key=value (OmegaConf dot-list syntax). A staged config (a
``stages:`` list, e.g. ``mvdream``) runs its stages in order in one trial folder, each stage seeded
from the previous one's checkpoint; ``stages.<stage>.<key>=value`` overrides one stage only, and
``resume=<trial folder>`` continues the unfinished stages. User mistakes print one line and exit
with code 2.
"""
import argparse
import importlib
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR / "configs"  # the bundled configs, found by name
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "transformer-engine")
EXTENSIONS_DIR = PACKAGE_DIR.parent / "extensions"  # a source checkout's plug-ins
EXTENSIONS_ENV = "THREESTUDIO_MV_EXTENSIONS"  # more plug-in folders, os.pathsep-separated


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
    """Top-level keys of a trial config (docs/conventions.md)."""

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
    if args.gpu is not None and not all(part.strip().isdigit() for part in str(args.gpu).split(",")):
        raise UserError(f"--gpu takes GPU indices like 0 or 0,1; got '{args.gpu}'")
    return args, extras


def extension_dirs() -> List[Path]:
    """Plug-in folders, in import order: the source checkout's ``extensions/``, ``./extensions`` in
    the working directory (threestudio's ``custom/``; works for an installed package) and the folders
    in ``$THREESTUDIO_MV_EXTENSIONS``; missing ones and repeats are skipped."""
    candidates = [EXTENSIONS_DIR, Path.cwd() / "extensions"]
    candidates += [Path(p).expanduser() for p in os.environ.get(EXTENSIONS_ENV, "").split(os.pathsep) if p]
    found: List[Path] = []
    for folder in candidates:
        if folder.is_dir() and folder.resolve() not in found:
            found.append(folder.resolve())
    return found


def import_extensions() -> List[str]:
    """Import every plug-in package (a folder with ``__init__.py``) in :func:`extension_dirs`, so its
    modules register themselves; returns the imported package names. A plug-in that fails to import
    is a UserError naming it."""
    from threestudio_mv.utils.errors import UserError

    imported = []
    for folder in extension_dirs():
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
        for child in sorted(folder.iterdir()):
            if (child / "__init__.py").exists() and child.name not in sys.modules:
                try:
                    importlib.import_module(child.name)
                except ImportError as error:
                    raise UserError(f"extension '{child}' does not import ({error}); install what it needs or remove it") from None
                imported.append(child.name)
    return imported


def load_yaml_with_extends(path: Path, seen: Tuple[Path, ...] = ()):
    """Load a trial YAML; a top-level ``extends: other.yaml`` (relative to the file) is merged under it."""
    from omegaconf import OmegaConf

    from threestudio_mv.utils.errors import UserError

    path = path.resolve()
    if path in seen:
        raise UserError(f"config '{path}' extends itself (cycle: {' -> '.join(str(p) for p in seen)})")
    if not path.is_file():
        raise UserError(f"config file '{path}' not found")
    try:
        config = OmegaConf.load(path)
    except Exception as error:  # yaml's parser errors have no common base with OmegaConf's
        if "yaml" not in type(error).__module__ and not isinstance(error, ValueError):
            raise
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"config '{path}' is not valid YAML: {reason}") from None
    base = config.pop("extends", None)
    if base is None:
        return config
    return OmegaConf.merge(load_yaml_with_extends(path.parent / str(base), seen + (path,)), config)


def find_config(name: str) -> Path:
    """A config path, or the name of a bundled config (``mvdream`` or ``mvdream.yaml``)."""
    from threestudio_mv.utils.errors import UserError

    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file() and not path.parent.name:
            return candidate
    bundled = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise UserError(f"config file '{name}' not found (a path, or a bundled config: {bundled})")


def stage_config(config_dir: Path, name: str) -> Path:
    """A stage's config file: as written (absolute, or beside the staged config), else a bundled
    config of that name (a trial folder's raw.yaml made before stage paths were saved absolute)."""
    for candidate in (Path(name), config_dir / name):
        if candidate.is_absolute() and candidate.is_file():
            return candidate
    if (config_dir / name).is_file():
        return config_dir / name
    return find_config(Path(name).name)


def trial_config_of_resume(resume: str) -> Path:
    """The config a trial was made with, from ``resume=`` (a checkpoint or a staged trial's folder)."""
    from threestudio_mv.utils.errors import UserError

    target = Path(resume).resolve()
    config = (target if target.is_dir() else target.parent.parent) / "configs" / "raw.yaml"
    if target.is_dir() and not config.is_file():
        raise UserError(f"resume='{resume}' is a folder but not a staged trial: pass its ckpts/last.ckpt")
    if not config.is_file():
        raise UserError(f"resume='{resume}': no trial config at '{config}' (resume= takes <trial>/ckpts/last.ckpt)")
    return config


def merge_overrides(base: Any, overrides: Any) -> Any:
    """``overrides`` merged over ``base``; where they switch a module (``system.<part>_type``), base's
    settings of the old module (``system.<part>``) are dropped: they belong to it, and the new module
    starts from its defaults and the overrides' settings."""
    from omegaconf import OmegaConf

    system, new_system = base.get("system") or {}, overrides.get("system") or {}
    replaced = [
        key[: -len("_type")] for key in new_system
        if key.endswith("_type") and system.get(key) is not None and new_system[key] != system.get(key)
    ]
    if replaced:
        base = OmegaConf.merge(base, {})  # a copy
        for part in replaced:
            if part in base.system:
                base.system[part] = {}
    return OmegaConf.merge(base, overrides)


def load_config(args: argparse.Namespace, overrides: List[str]):
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from threestudio_mv.utils.errors import UserError

    stage_overrides = [o for o in overrides if o.startswith("stages.")]
    try:
        cli = OmegaConf.from_dotlist([o for o in overrides if not o.startswith("stages.")])
        per_stage = OmegaConf.from_dotlist([o[len("stages."):] for o in stage_overrides])
    except OmegaConfBaseException as error:
        raise UserError(f"bad override in {' '.join(overrides)}: {str(error).splitlines()[0]}") from None
    if args.config is None:
        resume = cli.get("resume")
        if not resume:
            raise UserError("--config is required (or pass resume=<trial>/ckpts/last.ckpt to reuse a trial's config)")
        path = trial_config_of_resume(str(resume))
    else:
        path = find_config(args.config)
    try:
        raw = merge_overrides(load_yaml_with_extends(path), cli)
    except OmegaConfBaseException as error:
        raise UserError(f"cannot read config '{path}': {str(error).splitlines()[0]}") from None
    if stage_overrides and "stages" not in raw:
        raise UserError(f"override '{stage_overrides[0]}': config '{path}' has no stages")
    raw["_config_dir"] = str(path.resolve().parent)
    if stage_overrides:
        raw["stage_overrides"] = per_stage
    return raw


def trial_tag(cfg: Any) -> str:
    if cfg.tag:
        return cfg.tag
    prompt = (cfg.system.get("prompt_processor") or {}).get("prompt") if isinstance(cfg.system, dict) else None
    from threestudio_mv.utils.trial import slug

    return slug(prompt or Path(str(cfg.data.get("root", "") or "")).name or "default")


def resolve_trial_dir(cfg: Any) -> Path:
    if cfg.resume:
        target = Path(cfg.resume).resolve()
        return target if target.is_dir() else target.parent.parent
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
    """Library warnings and info lines off (Lightning's device lines and advertising tips): Lightning
    sets its loggers' levels when imported, so it is imported first."""
    import warnings

    import pytorch_lightning  # noqa: F401
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar at every text-encoder load
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", module="lightning_fabric")
    warnings.filterwarnings("ignore", category=UserWarning, message=".*does not have many workers.*")
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric",
                 "pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


#: Modules that --test/--export may swap for others (a turntable in a panorama instead of white).
REPLACEABLE_IN_EVAL = ("background.",)


def check_checkpoint_matches(system: Any, checkpoint: str, replaceable: Tuple[str, ...] = ()) -> None:
    """A one-line error when ``checkpoint`` was made by a trial of another config (other modules or
    sizes); weights under the ``replaceable`` prefixes are not compared."""
    import torch

    from threestudio_mv.utils.errors import UserError

    saved = torch.load(checkpoint, map_location="cpu", weights_only=False).get("state_dict", {})
    own = system.state_dict()
    saved = {k: v for k, v in saved.items() if not k.startswith(replaceable)}
    own = {k: v for k, v in own.items() if not k.startswith(replaceable)}
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    resized = sorted(k for k in set(own) & set(saved) if tuple(own[k].shape) != tuple(saved[k].shape))
    for problem, keys in (("lacks", missing), ("has unknown", unexpected), ("has other shapes for", resized)):
        if keys:
            raise UserError(
                f"checkpoint '{checkpoint}' was made with another config: it {problem} {len(keys)} of this trial's "
                f"weights (e.g. {', '.join(keys[:3])}); resume it with its own config (leave out --config)"
            )


def process_seed(seed: int) -> int:
    """The seed of this process: ``seed`` + its global rank under DDP (threestudio's rule), so the ranks
    sample different cameras and noise; the model's weights are broadcast from rank 0 anyway."""
    rank = os.environ.get("RANK") or os.environ.get("GLOBAL_RANK")
    if rank is None:
        local, node = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("NODE_RANK", 0))
        rank = node * int(os.environ.get("LOCAL_WORLD_SIZE", 1)) + local
    return seed + int(rank)


def main(argv: List[str]) -> int:
    args, overrides = parse_args(argv)
    if not args.verbose:
        quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    import_extensions()
    raw = load_config(args, overrides)
    if "stages" in raw:
        run_stages(args, raw, argv)
    else:
        run_trial(args, raw, argv)
    return 0


def run_stages(args: argparse.Namespace, raw: Any, argv: List[str]) -> Path:
    """Run a staged config: each stage a complete config in ``<trial>/<stage>/``, seeded from the
    previous stage's last checkpoint; a finished stage is skipped, an unfinished one resumed."""
    import torch
    from omegaconf import OmegaConf

    from threestudio_mv.utils.config import parse_structured
    from threestudio_mv.utils.errors import UserError

    config_dir = Path(raw.pop("_config_dir"))
    stages = raw.pop("stages")
    per_stage = raw.pop("stage_overrides", None) or {}
    if not stages or not all(isinstance(stage, (dict,)) or OmegaConf.is_dict(stage) for stage in stages):
        raise UserError("config key 'stages' must be a list of {name: ..., config: <file>} entries")
    names = [str(stage.get("name", "")) for stage in stages]
    if any(not name for name in names) or len(set(names)) != len(names):
        raise UserError(f"config key 'stages': every stage needs a unique name, got {names}")
    unknown = set(per_stage) - set(names)
    if unknown:
        raise UserError(f"override 'stages.{sorted(unknown)[0]}...': no such stage; the stages are {', '.join(names)}")
    shared = OmegaConf.create({k: v for k, v in raw.items() if k != "resume"})
    head = parse_structured(TrialConfig, OmegaConf.merge(shared, {"data_type": "-", "system_type": "-"}), "")
    trial_dir = Path(raw.resume).resolve() if raw.get("resume") else resolve_trial_dir(head)
    if raw.get("resume") and not trial_dir.is_dir():
        raise UserError(f"resume='{raw.resume}': no such trial folder")
    if args.train:
        (trial_dir / "configs").mkdir(parents=True, exist_ok=True)
        located = [{**OmegaConf.to_container(stage), "config": str(stage_config(config_dir, str(stage.config)).resolve())} for stage in stages]
        OmegaConf.save(OmegaConf.merge(shared, {"stages": located}), trial_dir / "configs" / "raw.yaml")
        with open(trial_dir / "cmd.txt", "a") as handle:
            handle.write(" ".join(shlex.quote(a) for a in [sys.executable, "-m", "threestudio_mv.launch", *argv]) + "\n")
    stage_raws = [merge_overrides(merge_overrides(load_yaml_with_extends(stage_config(config_dir, str(stage.config))), shared), per_stage.get(name) or {})
                  for name, stage in zip(names, stages)]
    for stage_raw in stage_raws:  # every stage's keys checked before the first one trains
        check_system_keys(stage_raw)
    previous: Optional[Path] = None
    for index, (name, stage_raw) in enumerate(zip(names, stage_raws)):
        last = index == len(stages) - 1
        stage_dir = trial_dir / name
        checkpoint = stage_dir / "ckpts" / "last.ckpt"
        if previous is not None and not OmegaConf.select(stage_raw, "system.geometry_convert_from"):
            stage_raw.system.geometry_convert_from = str(previous)
        stage_args = argparse.Namespace(**vars(args))
        stage_args.export, stage_args.test = args.export and last, args.test and last
        stage_args.validate = args.validate and last
        if checkpoint.is_file():
            stage_raw.resume = str(checkpoint)
            steps_done = int(torch.load(checkpoint, map_location="cpu", weights_only=False).get("global_step", 0))
            max_steps = OmegaConf.select(stage_raw, "trainer.max_steps", default=TrainerConfig.max_steps)
            stage_args.train = args.train and steps_done < max_steps
        elif not args.train:
            raise UserError(f"stage '{name}' of '{trial_dir}' has no checkpoint: run it with --train first")
        if stage_args.train or stage_args.export or stage_args.test or stage_args.validate:
            print(f"stage {index + 1}/{len(stages)}: {name}", flush=True)
            run_trial(stage_args, stage_raw, argv, trial_dir=stage_dir)
        previous = checkpoint
    print(f"trial folder: {trial_dir}")
    return trial_dir


def check_system_keys(raw: Any) -> None:
    """Parse a trial config's system keys and those of its modules (``<part>_type`` + ``<part>``) against
    their Config dataclasses without building anything: a mistake is a one-line error up front."""
    from omegaconf import OmegaConf

    import threestudio_mv
    from threestudio_mv.utils.config import parse_structured

    cfg = parse_structured(TrialConfig, OmegaConf.masked_copy(raw, [k for k in raw if k in TrialConfig.__dataclass_fields__]))
    if not cfg.system_type:
        return
    system_cls = threestudio_mv.find(cfg.system_type)
    system = parse_structured(system_cls.Config, cfg.system, "system")
    for key in vars(system):
        if key.endswith("_type") and isinstance(getattr(system, key), str) and getattr(system, key):
            part = key[: -len("_type")]
            module_cls = threestudio_mv.find(getattr(system, key))
            if hasattr(module_cls, "Config") and isinstance(cfg.system.get(part), dict):
                parse_structured(module_cls.Config, cfg.system[part], f"system.{part}")


def run_trial(args: argparse.Namespace, raw: Any, argv: List[str], trial_dir: Optional[Path] = None) -> Path:
    """Run one trial (one config) with Lightning; ``trial_dir`` fixes its folder (a stage's)."""
    from omegaconf import OmegaConf

    import threestudio_mv
    from threestudio_mv.utils.config import config_to_dict, parse_structured
    from threestudio_mv.utils.errors import UserError

    raw.pop("_config_dir", None)
    cfg: TrialConfig = parse_structured(TrialConfig, raw)
    if not cfg.system_type:
        raise UserError("config key 'system_type' is empty; set it to a registered system, e.g. mvdream-system")
    if not cfg.data_type:
        raise UserError("config key 'data_type' is empty; set it to a registered data module")
    if cfg.resume and not Path(cfg.resume).is_file():
        raise UserError(f"checkpoint '{cfg.resume}' not found (resume= must point to a .ckpt file)")
    if cfg.trainer.precision not in PRECISIONS:
        raise UserError(f"config key 'trainer.precision' is '{cfg.trainer.precision}'; use one of {', '.join(PRECISIONS)}")
    if (args.test or args.validate or args.export) and not args.train and not cfg.resume:
        raise UserError("--test/--validate/--export without --train need a trained trial: pass resume=<trial>/ckpts/last.ckpt")

    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    from threestudio_mv.utils.trainer import AtomicCheckpointIO, StepProgressBar

    trial_dir = trial_dir or resolve_trial_dir(cfg)
    pl.seed_everything(process_seed(cfg.seed), workers=True, verbose=False)
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
            handle.write(" ".join(shlex.quote(a) for a in [sys.executable, "-m", "threestudio_mv.launch", *argv]) + "\n")

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

    if cfg.resume:
        check_checkpoint_matches(system, cfg.resume, () if args.train else REPLACEABLE_IN_EVAL)
    if args.train:
        trainer.fit(system, datamodule=datamodule, ckpt_path=cfg.resume)
    elif cfg.resume:
        system.load_trained(cfg.resume, REPLACEABLE_IN_EVAL)
    if args.validate:
        trainer.validate(system, datamodule=datamodule)
    if args.test:
        trainer.test(system, datamodule=datamodule)
        if trainer.is_global_zero:
            for name, path in system.test_outputs.items():
                print(f"test {name}: {path}")
    if args.export and trainer.is_global_zero:
        outputs = system.export()
        for name, path in outputs.items():
            print(f"exported {name}: {path}")
    if trainer.is_global_zero:
        print(f"trial folder: {trial_dir}")
    return trial_dir


def cli() -> None:
    """Entry point of the ``threestudio-mv`` command."""
    from threestudio_mv.utils.errors import exit_on_user_error

    sys.exit(exit_on_user_error(main)(sys.argv[1:]))


if __name__ == "__main__":
    cli()
