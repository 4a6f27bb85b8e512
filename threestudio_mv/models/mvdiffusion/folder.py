"""Model folders of the family, written and read in one place.

A model folder is diffusers-shaped: ``unet/`` (loadable alone with diffusers' ``from_pretrained``),
``scheduler/`` where the model samples, ``model_index.json`` (``_class_name``, one entry per component,
and the model's metadata dataclass under ``metadata``) and whatever files a model adds beside them
(the prior encoder of the novel-view model, the CAA blocks of the panorama model, ...). Written
atomically: a temporary folder renamed into place.
"""
import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Type, TypeVar, Union

import torch
from diffusers import DDPMScheduler
from torch import nn

from threestudio_mv.utils.errors import UserError
from threestudio_mv.utils.io import atomic_directory

MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
Metadata = TypeVar("Metadata")
PathLike = Union[str, Path]


def write_model_folder(
    directory: PathLike,
    class_name: str,
    unet: nn.Module,
    metadata: Any,
    scheduler_config: Optional[Dict[str, Any]] = None,
    components: Optional[Dict[str, Any]] = None,
    write_extra: Optional[Callable[[Path], None]] = None,
    half: bool = True,
) -> Path:
    """Write ``unet`` (a float16 copy when ``half``: it halves the shipped folder; loading casts back),
    the scheduler (when given), ``write_extra(tmp_folder)``'s files and the index with ``components``."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        # nn.Module.to, not diffusers' override, which warns on every cast to float16; a CPU copy (a GPU run's too)
        saved = nn.Module.to(copy.deepcopy(unet), "cpu", torch.float16 if half else None)
        saved.save_pretrained(tmp / "unet", safe_serialization=True)
        index: Dict[str, Any] = {"_class_name": class_name, "unet": ["diffusers", type(unet).__name__]}
        if scheduler_config is not None:
            DDPMScheduler.from_config(scheduler_config).save_pretrained(tmp / "scheduler")
            index["scheduler"] = ["diffusers", "DDPMScheduler"]
        if write_extra is not None:
            write_extra(tmp)
        index.update(components or {})
        index["metadata"] = dataclasses.asdict(metadata)
        (tmp / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return directory


def open_model_folder(directory: Optional[PathLike], default: Path, kind: str, required: Sequence[str] = ()) -> Path:
    """``directory`` (user paths expanded; ``default`` when None), checked to hold the index, ``unet/``
    and ``required``; a one-line UserError names the folder, the kind and what is missing."""
    folder = Path(directory).expanduser() if directory is not None else default
    if not folder.is_dir():
        raise UserError(f"{kind} model folder '{folder}' does not exist; pass the folder a training run exported")
    missing: List[str] = [name for name in (MODEL_INDEX, "unet/config.json", *required) if not (folder / name).is_file()]
    if missing:
        raise UserError(f"'{folder}' is not a {kind} model folder: missing {', '.join(missing)}")
    return folder


def read_folder_metadata(directory: Path, metadata_class: Type[Metadata]) -> Metadata:
    """The folder's metadata as ``metadata_class`` (keys it does not know are ignored)."""
    try:
        index = json.loads((Path(directory) / MODEL_INDEX).read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"model folder '{directory}': {MODEL_INDEX} is not valid JSON ({error})") from None
    known = {f.name for f in dataclasses.fields(metadata_class)}  # type: ignore[arg-type]
    return metadata_class(**{k: v for k, v in index.get("metadata", {}).items() if k in known})


def load_folder_unet(directory: Path, unet_class: Type[nn.Module]) -> nn.Module:
    """The folder's ``unet/`` as ``unet_class`` (a diffusers model class) in float32."""
    return unet_class.from_pretrained(str(Path(directory) / "unet"), low_cpu_mem_usage=False, torch_dtype=torch.float32)


def load_scheduler_config(directory: Path) -> Dict[str, Any]:
    """The folder's scheduler config as a plain dict."""
    return dict(DDPMScheduler.load_config(str(Path(directory) / "scheduler")))
