from dataclasses import dataclass, field
from pathlib import Path

import pytest

import threestudio_mv
from threestudio_mv.utils.config import C, Schedule, parse_structured, schedule
from threestudio_mv.utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    steps: int = 10
    lr: float = 0.1
    weight: Schedule = schedule([0, 1.0, 0.0, 100])


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)


def test_defaults_and_overrides():
    cfg = parse_structured(Outer, {"inner": {"lr": 1, "weight": 0.5}})
    assert cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.weight == 0.5 and cfg.inner.steps == 10


def test_unknown_key_names_key_and_valid_keys():
    with pytest.raises(UserError) as error:
        parse_structured(Outer, {"inner": {"stepz": 3}}, prefix="system")
    message = str(error.value)
    assert "system.inner.stepz" in message and "steps" in message and "\n" not in message


def test_wrong_type_names_key_expected_and_given():
    with pytest.raises(UserError) as error:
        parse_structured(Outer, {"inner": {"steps": "many"}})
    message = str(error.value)
    assert "inner.steps" in message and "many" in message and "Integer" in message


def test_schedule_fields_are_checked():
    with pytest.raises(UserError, match="inner.weight"):
        parse_structured(Outer, {"inner": {"weight": "high"}})
    with pytest.raises(UserError, match="inner.weight"):
        parse_structured(Outer, {"inner": {"weight": [1, 2]}})


def test_schedule_values():
    assert C(0.3, 500) == 0.3
    assert C([0, 1.0, 0.0, 100], 50) == pytest.approx(0.5)
    assert C([0, 1.0, 0.0, 100], 1000) == pytest.approx(0.0)
    assert C([10, 2.0, 4.0, 20], 0) == pytest.approx(2.0)
    assert C([2.0, 4.0, 20], 10) == pytest.approx(3.0)


def test_piecewise_schedule_ramps_up_then_down():
    points = [[50, 0.0], [200, 500.0], [400, 25.0]]
    assert C(points, 0) == 0.0  # constant before the first point
    assert C(points, 125) == pytest.approx(250.0)
    assert C(points, 200) == pytest.approx(500.0)
    assert C(points, 300) == pytest.approx(262.5)
    assert C(points, 1000) == pytest.approx(25.0)  # constant after the last point
    parsed = parse_structured(Outer, {"inner": {"weight": points}})
    assert C(parsed.inner.weight, 300) == pytest.approx(262.5)  # works on OmegaConf lists too
    with pytest.raises(UserError, match="inner.weight.*increasing steps"):
        parse_structured(Outer, {"inner": {"weight": [[200, 1.0], [100, 2.0]]}})
    with pytest.raises(UserError, match="inner.weight"):
        parse_structured(Outer, {"inner": {"weight": [[0, 1.0], [100]]}})


def test_schedule_values_bound_the_schedule_over_all_steps():
    from threestudio_mv.utils.config import schedule_values

    for value in (3, [100, 1.0, 3.0, 200], [2.0, 0.5, 40], [[0, 2.0], [50, 0.25], [90, 4.0]]):
        knots = schedule_values(value)
        samples = [C(value, step) for step in range(0, 300)]
        assert min(samples) == pytest.approx(min(knots)) and max(samples) == pytest.approx(max(knots))



@pytest.mark.parametrize("name", ["mvdream-coarse", "mvdream-refine", "mvdream-texture", "mvdream-sds", "mvdream-shading",
                                  "mvdream-sd21", "reconstruction-refine"])
def test_single_stage_configs_build(name, tmp_path):
    """Each shipped single-stage config (with its `extends`) parses strictly and builds its modules."""
    from threestudio_mv.launch import TrialConfig, load_yaml_with_extends

    raw = load_yaml_with_extends(REPO / "configs" / f"{name}.yaml")
    if "prompt_processor" in raw.system:
        raw.system.prompt_processor.prompt = "a red cube"
    cfg = parse_structured(TrialConfig, raw)
    if cfg.data_type != "posed-images-datamodule":  # that one needs a data folder
        threestudio_mv.find(cfg.data_type)(cfg.data)
    system = threestudio_mv.find(cfg.system_type)(cfg.system, trial_dir=str(tmp_path))
    assert system.geometry.cfg.radius > 0


def test_default_camera_light_is_the_light_of_the_bundled_models_training_renders():
    from threestudio_mv.launch import load_yaml_with_extends
    from threestudio_mv.utils.camera import CameraLight

    configured, rendered = load_yaml_with_extends(REPO / "configs" / "mvdream-texture.yaml").data.camera_light, CameraLight()
    assert list(configured.direction_camera) == pytest.approx(list(rendered.direction_camera))
    assert configured.ambient_ratio == pytest.approx(rendered.ambient_ratio)


@pytest.mark.parametrize("name", ["mvdream", "reconstruction-mesh"])
def test_staged_configs_name_existing_stage_configs(name):
    from threestudio_mv.launch import find_config, load_yaml_with_extends

    path = find_config(name)
    stages = load_yaml_with_extends(path).stages
    assert len(stages) >= 2 and len({stage.name for stage in stages}) == len(stages)
    for stage in stages:
        assert "stages" not in load_yaml_with_extends(path.parent / stage.config)  # each stage a complete config
