"""The generation state machine (DeepCache.engine.state), driven by events with plain tensors: no model."""

from __future__ import annotations

import pytest
import torch

from DeepCache.engine.state import Generation, ReuseFeature, AdaptiveState
from DeepCache.engine.unet.layout import Action
from DeepCache.schedules.schedule import CacheParams, format_pattern, schedule_pattern

KEY = ((1, 4, 8, 8), torch.float32, torch.device("cpu"))
ACTIONS = (Action.RUN, Action.SKIP, Action.BOUNDARY, Action.RUN)


def generation(params: CacheParams, num_steps: int | None = None, adaptive: bool = False) -> Generation:
    return Generation(
        owner=None,
        params=params,
        actions=ACTIONS,
        num_steps=lambda: num_steps,
        adaptive=AdaptiveState(first_divergent=1) if adaptive else None,
    )


def evaluation(gen: Generation, key=KEY, value: float = 1.0) -> bool:
    """One evaluation as the U-Net patch drives it: begin, the boundary's store or handout, end."""
    full = gen.begin(key)
    if full:
        gen.feature.store(torch.full((2,), value))
    else:
        gen.feature.handout()
    gen.end(full)
    return full


@pytest.mark.parametrize("interval", [1, 2, 3, 5])
@pytest.mark.parametrize("mode", ["uniform", "non-uniform"])
def test_the_steps_follow_the_schedule(interval: int, mode: str) -> None:
    params = CacheParams(cache_interval=interval, skip_mode=mode, center=3)
    gen = generation(params, num_steps=10)
    pattern = tuple(evaluation(gen) for _ in range(10))
    assert pattern == schedule_pattern(params, 10) == tuple(gen.steps)


def test_a_full_step_stores_a_copy_and_a_retrieval_step_hands_it_out() -> None:
    gen = generation(CacheParams(cache_interval=3))
    assert gen.begin(KEY)
    out = torch.ones(3)
    gen.feature.store(out)
    gen.end(True)
    out.add_(1)  # the module's own output may change afterwards: the cache is a copy
    assert not gen.begin(KEY)
    assert torch.equal(gen.feature.handout(), torch.ones(3))
    assert gen.cache_bytes() == 3 * 4


def test_another_input_shape_forces_a_full_step() -> None:
    gen = generation(CacheParams(cache_interval=4))
    evaluation(gen)
    other = ((2, 4, 8, 8), torch.float32, torch.device("cpu"))
    assert [evaluation(gen, other), evaluation(gen, other), evaluation(gen)] == [True, False, True]


def test_a_consumer_that_modifies_the_feature_in_place_gets_copies_from_then_on() -> None:
    gen = generation(CacheParams(cache_interval=4))
    evaluation(gen)
    assert not gen.begin(KEY)
    gen.feature.handout().mul_(2)  # FreeU-like consumer
    assert gen.end(False)  # reported to the owner
    assert gen.feature.clone_handout and gen.feature.value is None
    assert gen.begin(KEY)  # the feature is gone: full step
    gen.feature.store(torch.ones(2))
    gen.end(True)
    assert not gen.begin(KEY)
    assert gen.feature.handout() is not gen.feature.value


def test_a_controlnet_commitment_is_kept_and_an_impossible_one_is_an_error() -> None:
    gen = generation(CacheParams(cache_interval=3))
    assert gen.peek(KEY)  # step 0: full, commits nothing
    evaluation(gen)
    assert not gen.peek(KEY) and gen.pending == 1
    assert not gen.peek(KEY)  # asked again (a second ControlNet): the same answer
    assert not gen.begin(KEY)
    gen.end(False)
    assert not gen.peek(KEY)
    gen.feature.reset()  # the cache vanished between the ControlNet and the U-Net
    with pytest.raises(RuntimeError, match="a ControlNet ran the shallow path"):
        gen.begin(KEY)


def test_abort_drops_the_feature_so_the_next_evaluation_is_full() -> None:
    gen = generation(CacheParams(cache_interval=5))
    evaluation(gen)
    gen.begin(KEY)
    gen.abort()
    assert gen.feature.value is None and gen.pending is None
    assert [evaluation(gen), evaluation(gen)] == [True, False]
    assert format_pattern(gen.steps) == "FrFr"


def test_reset_starts_over_and_release_keeps_the_history() -> None:
    gen = generation(CacheParams(cache_interval=3))
    for _ in range(4):
        evaluation(gen)
    gen.release()
    assert gen.feature.value is None and format_pattern(gen.steps) == "FrrF"
    gen.reset()
    assert gen.step == 0 and gen.steps == []
    assert format_pattern(evaluation(gen) for _ in range(4)) == "FrrF"


def test_non_uniform_without_the_number_of_steps_says_how_to_fix_it() -> None:
    gen = generation(CacheParams(cache_interval=3, skip_mode="non-uniform"))
    with pytest.raises(ValueError, match="reset_states\\(num_inference_steps=N\\)"):
        gen.begin(KEY)


def test_adaptive_steps_are_tentative_until_the_signal_decides() -> None:
    params = CacheParams(cache_interval=4, skip_mode="adaptive", threshold=0.1)
    gen = generation(params, adaptive=True)
    assert gen.begin(KEY)  # step 0: full
    gen.adaptive.reference = torch.ones(2)
    gen.feature.store(torch.ones(2))
    gen.end(True)
    assert not gen.begin(KEY) and gen.adaptive.deciding  # tentative retrieval step
    assert not gen.decide_adaptive(0.01)  # small change: stays a retrieval step
    gen.end(False)
    assert not gen.begin(KEY)
    assert gen.decide_adaptive(0.5)  # big change: full after all, the feature is refreshed
    assert gen.feature.value is None and gen.steps == [True, False, True] and gen.adaptive.streak == 0
    assert gen.adaptive.signals == [0.01, 0.5]
    gen.reset()
    assert gen.adaptive.signals == [] and gen.adaptive.reference is None


def test_the_reuse_feature_is_the_mode_state_forecasting_replaces() -> None:
    class Doubled(ReuseFeature):  # a stand-in for a forecast: hands out something other than the stored feature
        def handout(self):
            return self.value * 2

    gen = Generation(owner=None, params=CacheParams(cache_interval=3), actions=ACTIONS, feature=Doubled())
    evaluation(gen, value=3.0)
    assert not gen.begin(KEY)
    assert torch.equal(gen.feature.handout(), torch.full((2,), 6.0))
