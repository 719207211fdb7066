"""The one setting type of the tools: parsing, labels, round trips, and how it reaches the helper."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from DeepCache import DeepCacheSDHelper
from DeepCache.schedules.schedule import CacheParams, schedule_pattern
from DeepCache.tools.settings import BASELINE, Setting, applied, setting_grid

from .tiny import tiny_sd_unet, unet_inputs


@pytest.mark.parametrize(
    "text, expected, label",
    [
        ("3,0", Setting(3, 0), "I=3, B=0"),
        (" 5 , 1 ,non-uniform", Setting(5, 1, "non-uniform"), "I=5, B=1, non-uniform"),
        ("5,1,non-uniform,center=10,pow=2", Setting(5, 1, "non-uniform", center=10, pow=2),
         "I=5, B=1, non-uniform, center=10, pow=2"),
        ("1,2,custom,full_steps=8/0/4", Setting(1, 2, "custom", full_steps=(0, 4, 8)), "I=1, B=2, custom, full_steps=0/4/8"),
        ("1,0,custom,full_steps=3", Setting(1, 0, "custom", full_steps=(3,)), "I=1, B=0, custom, full_steps=3"),
        ("3,0,start_step=2,end_step=9", Setting(3, 0, start_step=2, end_step=9), "I=3, B=0, start_step=2, end_step=9"),
        ("I=4, B=1", Setting(4, 1), "I=4, B=1"),
        ("3,0,forecast=linear", Setting(3, 0, forecast="linear"), "I=3, B=0, forecast=linear"),
        ("2,1,forecast=linear,forecast_weight=0.5", Setting(2, 1, forecast="linear", forecast_weight=0.5),
         "I=2, B=1, forecast=linear, forecast_weight=0.5"),
        ("1,0,custom,full_steps=0/2/4,forecast=linear,forecast_weight=0,forecast_weights=0/0/0/0.5/0.25",
         Setting(1, 0, "custom", full_steps=(0, 2, 4), forecast="linear", forecast_weight=0.0,
                 forecast_weights=(0.0, 0.0, 0.0, 0.5, 0.25)),
         "I=1, B=0, custom, full_steps=0/2/4, forecast=linear, forecast_weight=0, forecast_weights=3x0/0.5/0.25"),
        ("1,0,custom,full_steps=0/3,forecast=linear,forecast_weights=2x0/1/ 3x0.25 ",
         Setting(1, 0, "custom", full_steps=(0, 3), forecast="linear", forecast_weights=(0, 0, 1, 0.25, 0.25, 0.25)),
         "I=1, B=0, custom, full_steps=0/3, forecast=linear, forecast_weights=2x0/1/3x0.25"),
        ("3,0,forecast=linear,forecast_weights=0.1/0.30000000000000004/1e-05",  # floats parse back exactly
         Setting(3, 0, forecast="linear", forecast_weights=(0.1, 0.1 + 0.2, 1e-5)),
         "I=3, B=0, forecast=linear, forecast_weights=0.1/0.30000000000000004/1e-05"),
        ("I=3, B=0, forecast=none", Setting(3, 0), "I=3, B=0"),
        ("original", BASELINE, "original"),
        ("Baseline", BASELINE, "original"),
        ("uncached", BASELINE, "original"),
    ],
)
def test_parse_and_label(text: str, expected: Setting, label: str) -> None:
    parsed = Setting.parse(text)
    assert parsed == expected
    assert parsed.label == label
    assert Setting.parse(parsed.label) == parsed  # every label parses back to its setting


@pytest.mark.parametrize(
    "text, message",
    [
        ("3", r"malformed setting '3': expected INTERVAL,BRANCH\[,SCHEDULE"),
        ("3;0", "malformed setting '3;0'"),
        ("3,,0", "malformed setting"),
        ("a,0", "INTERVAL and BRANCH must be integers"),
        ("3,0,uniform,4", "'4' is not KEY=VALUE with KEY one of center, pow, full_steps, start_step, end_step"),
        ("3,0,colour=red", "'colour=red' is not KEY=VALUE"),
        ("3,0,quadratic", r"setting '3,0,quadratic': skip_mode must be one of \('uniform', 'non-uniform', 'custom', 'adaptive'\)"),
        ("3,0,custom", 'skip_mode="custom" needs full_steps'),
        ("0,0", "cache_interval must be an integer >= 1"),
        ("3,-1", "cache_branch_id must be an integer >= 0"),
        ("3,0,non-uniform,pow=1", "pow must be a finite number > 1"),
        ("3,0,forecast=quadratic", 'forecast must be None \\(reuse the cached feature\\) or "linear"'),
        ("3,0,forecast_weight=0.5", 'forecast_weight and forecast_weights are only used with forecast="linear"'),
        ("3,0,forecast=linear,forecast_weight=nan", "forecast_weight must be a finite number"),
        ("3,0,forecast=linear,forecast_weights=0/x", "forecast_weights must be a sequence of finite numbers"),
        ("3,0,forecast=linear,forecast_weights=0x0.5", "forecast_weights must be a sequence of finite numbers"),
        ("3,0,forecast=linear,forecast_weights=2x", "forecast_weights must be a sequence of finite numbers"),
    ],
)
def test_parse_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Setting.parse(text)


def test_setting_is_a_cache_params_with_every_field() -> None:
    s = Setting(5, 1, "non-uniform", center=7)
    assert isinstance(s, CacheParams)
    names = [f.name for f in dataclasses.fields(CacheParams)]
    assert [f.name for f in dataclasses.fields(Setting)] == names  # no fields of its own: new ones flow through
    assert list(s.helper_kwargs()) == names
    assert s.to_dict() == {**s.helper_kwargs(), "label": "I=5, B=1, non-uniform, center=7"}
    assert schedule_pattern(s, 20) == schedule_pattern(CacheParams(**s.helper_kwargs()), 20)
    assert Setting.of(CacheParams(cache_interval=3, cache_branch_id=2)) == Setting(3, 2)
    assert Setting.of("5,0") == Setting(5, 0) and Setting.of(s) is s
    with pytest.raises(TypeError, match="expected a CacheParams"):
        Setting.of(3)  # type: ignore[arg-type]


def test_baseline_is_a_uniform_interval_of_one() -> None:
    assert BASELINE == Setting() and BASELINE.is_baseline and BASELINE.label == "original"
    assert Setting(1, 3).is_baseline  # a uniform interval of 1 never caches
    assert not Setting(1, 0, "custom", full_steps=(0, 5)).is_baseline
    assert not Setting(2, 0).is_baseline


def test_for_steps_moves_a_non_uniform_center_inside_the_generation() -> None:
    assert Setting(3, 0, "non-uniform").for_steps(10) == Setting(3, 0, "non-uniform", center=9)
    assert Setting(3, 0, "non-uniform").for_steps(50) == Setting(3, 0, "non-uniform")
    assert Setting(3, 0).for_steps(4) == Setting(3, 0)


def test_grid_is_interval_major() -> None:
    assert [s.label for s in setting_grid((2, 3), (0, 1))] == ["I=2, B=0", "I=2, B=1", "I=3, B=0", "I=3, B=1"]


def test_applied_enables_every_field_on_the_helper_and_always_disables() -> None:
    unet = tiny_sd_unet()
    helper = DeepCacheSDHelper(pipe=unet)
    setting = Setting(2, 1, start_step=1, end_step=4)
    latents, kwargs = unet_inputs(unet)
    with applied(helper, setting, num_steps=6), torch.no_grad():
        assert helper.enabled and helper.params == CacheParams(**setting.helper_kwargs())
        helper.reset_states()
        for t in range(6):
            unet(latents, 999 - 100 * t, **kwargs)
        assert helper.last_steps == schedule_pattern(setting, 6) == (True, True, False, True, True, True)
    assert not helper.enabled
    with pytest.raises(RuntimeError, match="boom"), applied(helper, setting, num_steps=6):
        raise RuntimeError("boom")
    assert not helper.enabled
    with applied(helper, BASELINE, num_steps=6):
        assert not helper.enabled  # the original pipeline runs without the helper


@pytest.mark.parametrize("setting", [
    Setting(3, 0), Setting(5, 1, "non-uniform", center=8), Setting(1, 2, "custom", full_steps=(0, 3, 9)),
    Setting(12, 0, "adaptive", threshold=0.0562), Setting(3, 0, start_step=2, end_step=9),
    Setting(3, 1, forecast="linear"), Setting(2, 0, forecast="linear", forecast_weight=0.75),
    Setting(1, 0, "custom", full_steps=(0, 2, 4), forecast="linear", forecast_weight=0.0,
            forecast_weights=(0.0, 0.0, 0.0, 0.5, 0.30000000000000004)),
])
def test_set_params_call_is_python_that_sets_the_same_setting(setting: Setting) -> None:
    calls: list[dict] = []

    class Recorder:
        def set_params(self, **kwargs: object) -> None:
            calls.append(kwargs)

    line = setting.set_params_call()
    assert line.startswith("helper.set_params(cache_interval=")
    eval(line, {"helper": Recorder()})  # noqa: S307 - our own output
    assert Setting(**calls[0]) == setting


def test_set_params_call_writes_a_forecast_readably() -> None:
    setting = Setting(1, 0, "custom", full_steps=(0, 2, 4), forecast="linear", forecast_weight=0.0,
                      forecast_weights=(0.0, 0.0, 0.0, 0.5, 0.25))
    assert setting.set_params_call() == (
        'helper.set_params(cache_interval=1, cache_branch_id=0, skip_mode="custom", full_steps=[0, 2, 4], '
        'forecast="linear", forecast_weight=0, forecast_weights=[0, 0, 0, 0.5, 0.25])')
    assert Setting(3, 0, forecast="linear").set_params_call() == (
        'helper.set_params(cache_interval=3, cache_branch_id=0, forecast="linear")')


def test_a_forecast_setting_reaches_the_helper_and_its_json() -> None:
    setting = Setting.parse("1,1,custom,full_steps=0/2/4,forecast=linear,forecast_weight=0,forecast_weights=3x0/0.5/0")
    unet = tiny_sd_unet()
    helper = DeepCacheSDHelper(pipe=unet)
    with applied(helper, setting, num_steps=5):
        assert helper.params == CacheParams(**setting.helper_kwargs())
        assert helper.params.forecast == "linear" and helper.params.forecast_weights == (0.0, 0.0, 0.0, 0.5, 0.0)
    assert Setting.of(CacheParams.from_json(setting.to_json())) == setting
    assert Setting.parse(Setting.of(CacheParams.from_json(setting.to_json())).label) == setting
