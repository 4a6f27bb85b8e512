"""Strict typed configs and C() schedules.

Every module declares a nested ``Config`` dataclass; :func:`parse_structured` turns a user dict (from
YAML and ``key=value`` overrides) into an instance of it. OmegaConf checks keys and types; its
multi-line exceptions are rewritten here into one line that names the full key and the fix.

A setting that may anneal is declared with :func:`schedule` and read with :func:`C`: either a number,
or ``[start_step, start_value, end_value, end_step]`` (linear between the steps, constant outside),
or ``[start_value, end_value, end_step]`` (start_step 0), or a list of ``[step, value]`` points with
increasing steps (piecewise linear through them, constant outside), e.g. ``[[50, 0], [200, 500],
[400, 25]]`` to ramp a weight up and then down.
"""
import dataclasses
from dataclasses import field
from typing import Any, List, Optional, Sequence, Type, TypeVar, Union

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from threestudio_mv.utils.errors import UserError

T = TypeVar("T")
ScheduleValue = Union[float, int, Sequence[float]]
# Annotation for schedule fields: OmegaConf cannot type "number or list", so it is Any and checked here.
Schedule = Any
_SCHEDULE_META = "schedule"


def schedule(default: ScheduleValue) -> Any:
    """Declare a dataclass field whose value may be a C() schedule: ``x: Schedule = schedule(0.5)``."""
    if isinstance(default, (list, tuple)):
        value = list(default)
        return field(default_factory=lambda: list(value), metadata={_SCHEDULE_META: True})
    return field(default=default, metadata={_SCHEDULE_META: True})


def C(value: ScheduleValue, step: int) -> float:
    """Evaluate a schedule (a number, or a list as in the module docstring) at a global step."""
    if isinstance(value, (int, float)):
        return float(value)
    if _is_point_list(value):
        steps, values = zip(*((float(point[0]), float(point[1])) for point in value))
        return float(np.interp(step, steps, values))
    values = [float(v) for v in value]
    if len(values) == 3:
        values = [0.0] + values
    start_step, start_value, end_value, end_step = values
    if end_step <= start_step:
        return end_value if step >= end_step else start_value
    return float(np.interp(step, (start_step, end_step), (start_value, end_value)))


def schedule_values(value: ScheduleValue) -> List[float]:
    """The values a schedule passes through at its knots. It is linear between them and constant
    outside, so its minimum and maximum over all steps are among these."""
    if isinstance(value, (int, float)):
        return [float(value)]
    if _is_point_list(value):
        return [float(point[1]) for point in value]
    return [float(v) for v in list(value)[-3:-1]]  # [start_step,] start_value, end_value, end_step


_SEQUENCES = (list, tuple, ListConfig)


def _is_point_list(value: Any) -> bool:
    return isinstance(value, _SEQUENCES) and len(value) > 0 and isinstance(value[0], _SEQUENCES)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_schedule(key: str, value: Any) -> None:
    if isinstance(value, bool):
        raise UserError(f"config key '{key}' expects a number or a schedule list, got bool {value!r}")
    if _is_number(value):
        return
    if _is_point_list(value):
        points_ok = all(isinstance(p, _SEQUENCES) and len(p) == 2 and all(map(_is_number, p)) for p in value)
        if points_ok and all(a[0] < b[0] for a, b in zip(value[:-1], value[1:])):
            return
        raise UserError(
            f"config key '{key}' expects [step, value] points with increasing steps, e.g. [[0, 1], [100, 0.5]], "
            f"got {_plain(value)!r}"
        )
    if isinstance(value, _SEQUENCES) and len(value) in (3, 4) and all(map(_is_number, value)):
        return
    raise UserError(
        f"config key '{key}' expects a number, a schedule [start_step, start_value, end_value, end_step] "
        f"or [step, value] points, got {_plain(value)!r}"
    )


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if isinstance(value, ListConfig) else value


def _valid_keys(schema: type, path: Sequence[str]) -> List[str]:
    cls = schema
    for part in path:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields or not dataclasses.is_dataclass(fields[part].type):
            return []
        cls = fields[part].type
    return [f.name for f in dataclasses.fields(cls)]


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix and key else (prefix or key)


def _one_line(error: OmegaConfBaseException, schema: type, prefix: str) -> str:
    full_key = str(getattr(error, "full_key", "") or "")
    message = str(getattr(error, "msg", "") or str(error)).splitlines()[0]
    if isinstance(error, ConfigKeyError) or "not in" in message:
        parts = full_key.split(".") if full_key else []
        valid = _valid_keys(schema, parts[:-1])
        return (
            f"unknown config key '{_join(prefix, full_key)}'; valid keys here: {', '.join(valid)}"
        )
    return f"config key '{_join(prefix, full_key)}': {message}"


def _validate_schedules(obj: Any, prefix: str) -> None:
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = _join(prefix, f.name)
        if f.metadata.get(_SCHEDULE_META):
            _check_schedule(key, value)
        elif dataclasses.is_dataclass(value):
            _validate_schedules(value, key)


def to_container(cfg: Any) -> Any:
    """A plain dict/list copy of an OmegaConf node (or the value itself)."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def parse_structured(schema: Type[T], cfg: Optional[Any] = None, prefix: str = "") -> T:
    """Validate ``cfg`` (dict, DictConfig or None) against dataclass ``schema`` and instantiate it.

    ``prefix`` is the key of this config inside the trial config (e.g. ``system.geometry``), so that
    error messages name the full key. Raises :class:`UserError` with one line on any mistake.
    """
    cfg = to_container(cfg) if cfg is not None else {}
    if not isinstance(cfg, dict):
        raise UserError(f"config key '{prefix or '<root>'}' expects a mapping, got {cfg!r}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        instance = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise UserError(_one_line(error, schema, prefix)) from None
    _validate_schedules(instance, prefix)
    return instance  # type: ignore[return-value]


def config_to_dict(instance: Any) -> dict:
    """A dataclass config back to a plain dict (for saving parsed.yaml)."""
    return OmegaConf.to_container(OmegaConf.structured(instance), resolve=True)  # type: ignore
