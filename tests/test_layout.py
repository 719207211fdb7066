"""What every wrapped module does on a retrieval step, for every branch: pure logic, no model.

Expectations are written from the SD 1.x/2.x skip numbering by hand (down block ``i`` layer ``j`` produces skip
``1 + 3i + j``, its downsampler ``3 + 3i``; up block ``u`` layer ``j`` consumes ``11 - 3u - j``), independently
of ``DeepCache.engine.unet.layout``'s own bookkeeping.
"""

from __future__ import annotations

import pytest

from DeepCache.engine.unet.layout import (
    Action,
    ModuleKey,
    Site,
    UNetLayout,
    controlnet_retrieval_action,
    retrieval_action,
    retrieval_plan,
)

SD = UNetLayout.from_counts(down=[(2, True)] * 3 + [(2, False)], up=[(3, True)] * 3 + [(3, False)])
SDXL = UNetLayout.from_counts(down=[(2, True)] * 2 + [(2, False)], up=[(3, True)] * 2 + [(3, False)])
PARTS = 2  # resnet + attention in every layer (the action must not depend on it, except for the boundary)


def unet_keys(layout: UNetLayout, parts: int = PARTS) -> list[ModuleKey]:
    keys = []
    for i, block in enumerate(layout.down):
        keys.append(ModuleKey(Site.DOWN_BLOCK, i))
        keys += [ModuleKey(Site.DOWN_LAYER, i, j, m, parts) for j in range(block.num_layers) for m in range(parts)]
        if block.has_sampler:
            keys.append(ModuleKey(Site.DOWN_SAMPLER, i))
    keys.append(ModuleKey(Site.MID))
    for u, block in enumerate(layout.up):
        keys.append(ModuleKey(Site.UP_BLOCK, u))
        keys += [ModuleKey(Site.UP_LAYER, u, j, m, parts) for j in range(block.num_layers) for m in range(parts)]
    return keys


def sd_expected(branch: int, key: ModuleKey) -> Action:
    b = branch
    down_block_runs = lambda i: 1 + 3 * i <= b  # noqa: E731  its first layer produces skip 1 + 3i
    if key.site is Site.DOWN_BLOCK:
        return Action.RUN if down_block_runs(key.block) else Action.SKIP
    if key.site is Site.DOWN_LAYER:
        return Action.RUN if not down_block_runs(key.block) or 1 + 3 * key.block + key.layer <= b else Action.SKIP
    if key.site is Site.DOWN_SAMPLER:
        return Action.RUN if not down_block_runs(key.block) or 3 + 3 * key.block <= b else Action.SKIP
    if key.site is Site.MID:
        return Action.BOUNDARY if b == 11 else Action.SKIP
    up_block_runs = lambda u: 11 - 3 * u - 2 <= b  # noqa: E731  its last layer consumes skip 9 - 3u
    consumed = 11 - 3 * key.block - key.layer
    if key.site is Site.UP_BLOCK:
        # the cached feature is the whole output of the up block before the one consuming skip b first
        if up_block_runs(key.block + 1) and not up_block_runs(key.block) and b == 11 - 3 * (key.block + 1):
            return Action.BOUNDARY
        return Action.RUN if up_block_runs(key.block) else Action.SKIP
    if not up_block_runs(key.block):
        return Action.RUN  # never called: its block is skipped whole
    if consumed <= b:
        return Action.RUN
    if consumed == b + 1 and key.part == key.parts - 1:
        return Action.BOUNDARY  # the layer before the one consuming skip b, inside the same block
    return Action.SKIP


@pytest.mark.parametrize("branch", range(SD.num_branches))
def test_sd_unet_actions_match_the_hand_numbering(branch: int) -> None:
    plan = retrieval_plan(SD, branch)
    for key in unet_keys(SD):
        assert retrieval_action(plan, key) is sd_expected(branch, key), (branch, key)


@pytest.mark.parametrize("layout", [SD, SDXL], ids=["sd", "sdxl"])
@pytest.mark.parametrize("parts", [1, 2, 4])
def test_exactly_one_boundary_at_every_branch(layout: UNetLayout, parts: int) -> None:
    for branch in range(layout.num_branches):
        plan = retrieval_plan(layout, branch)
        boundaries = [k for k in unet_keys(layout, parts) if retrieval_action(plan, k) is Action.BOUNDARY]
        assert len(boundaries) == 1, (branch, boundaries)
        (key,) = boundaries
        assert key.part == key.parts - 1 if key.site is Site.UP_LAYER else key.site in (Site.MID, Site.UP_BLOCK)
        assert (key.site is Site.MID) == (branch == layout.num_branches - 1)


def controlnet_keys(layout: UNetLayout) -> list[ModuleKey]:
    keys = [k for k in unet_keys(layout) if k.site in (Site.DOWN_BLOCK, Site.DOWN_LAYER, Site.DOWN_SAMPLER, Site.MID)]
    keys += [ModuleKey(Site.CONTROL_SKIP, s) for s in range(layout.num_branches)]
    return keys + [ModuleKey(Site.CONTROL_MID)]


@pytest.mark.parametrize("layout", [SD, SDXL], ids=["sd", "sdxl"])
def test_controlnet_computes_exactly_the_residuals_a_retrieval_step_consumes(layout: UNetLayout) -> None:
    deepest = layout.num_branches - 1
    for branch in range(layout.num_branches):
        plan = retrieval_plan(layout, branch)
        actions = {k: controlnet_retrieval_action(plan, k) for k in controlnet_keys(layout)}
        assert Action.BOUNDARY not in actions.values()  # a ControlNet never holds a cache
        zero_convs = {k.block for k, a in actions.items() if k.site is Site.CONTROL_SKIP and a is Action.RUN}
        assert zero_convs == set(range(branch + 1))
        # the mid residual is added to the cached mid-block output at the deepest branch: it must be computed
        mid = {actions[ModuleKey(Site.MID)], actions[ModuleKey(Site.CONTROL_MID)]}
        assert mid == ({Action.RUN} if branch == deepest else {Action.SKIP}), branch
        # its down path does what the U-Net's does
        for key, action in actions.items():
            if key.site in (Site.DOWN_BLOCK, Site.DOWN_LAYER, Site.DOWN_SAMPLER):
                assert action is retrieval_action(plan, key)
    # at the deepest branch a retrieval step needs all of it
    plan = retrieval_plan(layout, deepest)
    assert {controlnet_retrieval_action(plan, k) for k in controlnet_keys(layout)} == {Action.RUN}


def test_a_site_of_the_other_model_is_rejected() -> None:
    plan = retrieval_plan(SD, 0)
    with pytest.raises(ValueError, match="not a U-Net module site"):
        retrieval_action(plan, ModuleKey(Site.CONTROL_MID))
    with pytest.raises(ValueError, match="not a ControlNet module site"):
        controlnet_retrieval_action(plan, ModuleKey(Site.UP_LAYER, 0, 0))
