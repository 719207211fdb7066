"""The tools' one layer to generate, time and score (DeepCache.tools.runs), on a stub pipeline: what is timed, the
order, and that memory holds two batches of images whatever the number of settings and prompts."""

from __future__ import annotations

import time
import weakref
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from DeepCache.tools import runs
from DeepCache.tools.prompts import PromptItem
from DeepCache.tools.runs import RunSpec, merge_runs, repeat_order, rotation, run_and_score, timed
from DeepCache.tools.scoring import Scorer
from DeepCache.tools.settings import Setting


def test_timed_measures_only_the_call() -> None:
    value, seconds = timed(lambda: time.sleep(0.05) or "done")
    assert value == "done" and 0.05 <= seconds < 1.0


def test_every_setting_runs_first_in_some_repeat_and_repeat_zero_starts_with_the_original() -> None:
    count, repeats = 4, 4
    for batch in range(3):
        orders = [repeat_order(count, batch=batch, repeat=r) for r in range(repeats)]
        assert all(sorted(order) == list(range(count)) for order in orders)
        assert orders[0][0] == 0  # the reference is made first
        assert {order[0] for order in orders} == set(range(count))
    # with one repeat, the settings after the original still rotate from batch to batch
    assert {repeat_order(count, batch=b, repeat=0)[1] for b in range(3)} == {1, 2, 3}
    assert rotation([], 3) == []


#: What run_and_score is handed in place of a pipeline's kind: it only reads ``.pipe`` (for the stubbed helper).
STUB_KIND: Any = SimpleNamespace(pipe=None)


class _Tracked(np.ndarray):
    """An image batch whose lifetime the test can watch (weakref.finalize needs a subclass)."""


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """run_and_score with a stub generate_batch: images from the seed and setting, seconds from a script, and a count
    of the image batches alive at each call."""
    state: dict[str, Any] = {"alive": 0, "peak": 0, "calls": [], "seconds": {}}

    def fake(pipe: Any, helper: Any, setting: Setting, items: list[PromptItem], spec: RunSpec):
        state["calls"].append((setting.label, [i.seed for i in items]))
        noise = 0.0 if setting.is_baseline else 0.01 * setting.cache_interval
        images = np.stack([np.full((8, 8, 3), (i.seed % 7) / 10 + noise * (k % 2)) for k, i in enumerate(items)])
        tracked = images.astype(np.float32).view(_Tracked)
        state["alive"] += 1
        state["peak"] = max(state["peak"], state["alive"])
        weakref.finalize(tracked, lambda: state.__setitem__("alive", state["alive"] - 1))
        pattern = () if setting.is_baseline else (True,) + (False,) * (setting.cache_interval - 1)
        return tracked, state["seconds"].get(setting.label, 1.0), pattern

    monkeypatch.setattr(runs, "generate_batch", fake)
    monkeypatch.setattr("DeepCache.helper.DeepCacheSDHelper", lambda pipe: None)
    return state


def _items(n: int) -> list[PromptItem]:
    return [PromptItem(f"p{k}", k) for k in range(n)]


def test_memory_holds_two_batches_whatever_the_number_of_settings_and_prompts(stub: dict[str, Any]) -> None:
    settings = [Setting(n, 0) for n in range(2, 12)]
    result = run_and_score(STUB_KIND, _items(40), settings, Scorer(), RunSpec(4, 4.0, 2, 4))
    assert len(result) == 11 and all(run.images is None for run in result)
    assert stub["peak"] <= 2  # the original's batch (the reference) and the batch being scored
    assert len(stub["calls"]) == 1 + 10 * 11 * 2  # warm-up, then 10 batches x 11 settings x 2 repeats
    assert [len(run.scores.psnr) for run in result] == [40] * 11


def test_scores_and_seconds_follow_the_settings(stub: dict[str, Any]) -> None:
    stub["seconds"] = {"original": 2.0, "I=2, B=0": 1.0, "I=4, B=0": 0.5}
    result = run_and_score(STUB_KIND, _items(6), [Setting(4, 0), Setting(2, 0)], Scorer(), RunSpec(4, 4.0, 3, 4))
    assert [r.setting.label for r in result] == ["original", "I=4, B=0", "I=2, B=0"]
    assert [r.seconds for r in result] == [[4.0] * 3, [1.0] * 3, [2.0] * 3]  # two batches a repeat
    assert result[1].patterns == [(True, False, False, False)] * 2 and result[1].batch_sizes == [4, 2]
    assert result[1].full_steps == 1.0 and result[0].full_steps is None
    # odd images differ by 0.01 * interval from the original's: PSNR = 20 log10(1 / (0.01 N))
    psnr = result[2].scores.psnr
    assert np.isinf(psnr[0::2]).all() and psnr[1::2] == pytest.approx(20 * np.log10(1 / 0.02), abs=1e-4)


def test_merge_puts_scores_in_prompt_order_and_takes_the_slowest_process(stub: dict[str, Any]) -> None:
    items, spec, settings = _items(6), RunSpec(4, 4.0, 1, 2), [Setting(3, 0)]
    parts = []
    for rank, batches in enumerate(([[0, 1], [4, 5]], [[2, 3]])):
        stub["seconds"] = {"original": 1.0 + rank}
        parts.append((batches, run_and_score(STUB_KIND, items, settings, Scorer(), spec, batches=batches)))
    whole = run_and_score(STUB_KIND, items, settings, Scorer(), spec)
    merged = merge_runs(parts)
    np.testing.assert_array_equal(merged[1].scores.psnr, whole[1].scores.psnr)
    assert merged[0].seconds == [2.0] and len(merged[1].patterns) == 3
