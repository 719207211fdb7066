"""Skip-connection layout of a U-Net and what a retrieval step runs: pure functions.

A diffusers U-Net keeps a list of skip connections: the ``conv_in`` output (branch 0), then one
per layer (resnet, with its attention if any) of each down block, then one per downsampler.
Up blocks consume them in reverse, one per up layer. ``cache_branch_id = b`` means: on a
retrieval step run ``conv_in``, the down layers producing skips ``1..b``, the up layers consuming
skips ``0..b`` and the output layers; take the hidden state entering the up layer that consumes
skip ``b`` from the cache filled at the last full step.

Example (Stable Diffusion 1.x/2.x: 4 down blocks, 2 layers each, 3 downsamplers)::

    >>> from DeepCache.engine.unet.layout import UNetLayout, retrieval_plan
    >>> sd = UNetLayout.from_counts(down=[(2, True)] * 3 + [(2, False)], up=[(3, True)] * 3 + [(3, False)])
    >>> sd.num_branches
    12
    >>> plan = retrieval_plan(sd, 0)
    >>> plan.down_block_runs, plan.up_block_runs, plan.boundary
    ((False, False, False, False), (False, False, False, True), Boundary(kind='up_layer', block=3, layer=1))
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable, Literal


@dataclass(frozen=True)
class BlockLayout:
    """One down or up block: how many skip-producing/consuming layers, and whether it resamples."""

    num_layers: int
    has_sampler: bool


@dataclass(frozen=True)
class UNetLayout:
    """The skip-connection structure of a U-Net (see the module docstring)."""

    down: tuple[BlockLayout, ...]
    up: tuple[BlockLayout, ...]
    has_mid: bool = True

    @classmethod
    def from_counts(
        cls, down: Iterable[tuple[int, bool]], up: Iterable[tuple[int, bool]], has_mid: bool = True
    ) -> "UNetLayout":
        return cls(tuple(BlockLayout(n, s) for n, s in down), tuple(BlockLayout(n, s) for n, s in up), has_mid)

    def __post_init__(self) -> None:
        consumed = sum(block.num_layers for block in self.up)
        if consumed != self.num_branches:
            raise ValueError(
                f"unsupported U-Net layout: the down path produces {self.num_branches} skip connections "
                f"but the up path consumes {consumed}."
            )
        if not self.has_mid:
            raise ValueError("unsupported U-Net layout: DeepCache needs a mid block (mid_block_type must not be None).")

    @property
    def num_branches(self) -> int:
        """Number of skip connections = number of valid ``cache_branch_id`` values."""
        return 1 + sum(block.num_layers + int(block.has_sampler) for block in self.down)

    def down_skip_ids(self) -> tuple[tuple[tuple[int, ...], int | None], ...]:
        """Per down block: the skip ids its layers produce, and the one its downsampler produces."""
        out = []
        next_id = 1
        for block in self.down:
            layers = tuple(range(next_id, next_id + block.num_layers))
            next_id += block.num_layers
            sampler = None
            if block.has_sampler:
                sampler = next_id
                next_id += 1
            out.append((layers, sampler))
        return tuple(out)

    def up_skip_ids(self) -> tuple[tuple[int, ...], ...]:
        """Per up block: the skip id each of its layers consumes (deepest first)."""
        out = []
        next_id = self.num_branches - 1
        for block in self.up:
            out.append(tuple(range(next_id, next_id - block.num_layers, -1)))
            next_id -= block.num_layers
        return tuple(out)


@dataclass(frozen=True)
class Boundary:
    """Where the cached feature comes from: the output that enters the up layer consuming skip ``b``.

    ``kind="mid"``: the mid block's output; ``"up_block"``: the whole output of up block ``block``
    (its upsampler included); ``"up_layer"``: the output of layer ``layer`` of up block ``block``
    (its last module: the attention if the block has one, else the resnet).
    """

    kind: Literal["mid", "up_block", "up_layer"]
    block: int = -1
    layer: int = -1


@dataclass(frozen=True)
class RetrievalPlan:
    """What runs on a retrieval step for one branch (True = runs, False = skipped)."""

    branch: int
    down_block_runs: tuple[bool, ...]
    down_layer_runs: tuple[tuple[bool, ...], ...]
    down_sampler_runs: tuple[bool, ...]
    up_block_runs: tuple[bool, ...]
    up_layer_runs: tuple[tuple[bool, ...], ...]
    boundary: Boundary

    def describe(self) -> str:
        """A one-line human description, e.g. for the README's branch table."""
        down = sum(sum(layers) for layers in self.down_layer_runs) + sum(self.down_sampler_runs)
        up = sum(sum(layers) for layers in self.up_layer_runs)
        return f"conv_in, {down} down layer(s), {up} up layer(s), output layers"


def retrieval_plan(layout: UNetLayout, branch: int) -> RetrievalPlan:
    """Compute which layers a retrieval step with ``cache_branch_id = branch`` runs.

    Raises ``ValueError`` naming the valid range if ``branch`` is out of range for ``layout``.
    """
    if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < layout.num_branches:
        raise ValueError(
            f"cache_branch_id={branch!r} is out of range for this U-Net: valid ids are 0..{layout.num_branches - 1} "
            f"({layout.num_branches} skip connections, 0 = shallowest)."
        )
    down_layers, down_samplers, down_blocks = [], [], []
    for layers, sampler in layout.down_skip_ids():
        runs = tuple(s <= branch for s in layers)
        sampler_runs = sampler is not None and sampler <= branch
        down_layers.append(runs)
        down_samplers.append(sampler_runs)
        down_blocks.append(any(runs) or sampler_runs)

    up_layers, up_blocks = [], []
    boundary: Boundary | None = None
    for u, consumed in enumerate(layout.up_skip_ids()):
        runs = tuple(s <= branch for s in consumed)
        up_layers.append(runs)
        up_blocks.append(any(runs))
        if branch in consumed:
            j = consumed.index(branch)
            if j > 0:
                boundary = Boundary("up_layer", u, j - 1)
            elif u > 0:
                boundary = Boundary("up_block", u - 1)
            else:
                boundary = Boundary("mid")
    assert boundary is not None  # guaranteed by UNetLayout's consistency check
    return RetrievalPlan(
        branch=branch,
        down_block_runs=tuple(down_blocks),
        down_layer_runs=tuple(down_layers),
        down_sampler_runs=tuple(down_samplers),
        up_block_runs=tuple(up_blocks),
        up_layer_runs=tuple(up_layers),
        boundary=boundary,
    )


class Action(enum.Enum):
    """What a wrapped module does on a retrieval step."""

    RUN = "run"  # computes as usual
    SKIP = "skip"  # returns a placeholder of its full-step output's shape (never consumed)
    BOUNDARY = "boundary"  # returns the feature cached at the last full step


class Site(enum.Enum):
    """Where a wrapped module sits in a U-Net (or a ControlNet, which mirrors the U-Net's down path)."""

    DOWN_BLOCK = "down_block"
    DOWN_LAYER = "down_layer"
    DOWN_SAMPLER = "down_sampler"
    MID = "mid"
    UP_BLOCK = "up_block"
    UP_LAYER = "up_layer"
    CONTROL_SKIP = "control_skip"  # a ControlNet's zero convolution for skip connection ``block``
    CONTROL_MID = "control_mid"  # a ControlNet's zero convolution for the mid block


@dataclass(frozen=True)
class ModuleKey:
    """One wrapped module: its site, block and layer, and its place among the ``parts`` modules of a layer.

    A layer is what produces (down) or consumes (up) one skip connection; it is made of one to four
    modules run in order (resnet, then attention / temporal layers / motion module, as the block has them).
    """

    site: Site
    block: int = -1
    layer: int = -1
    part: int = 0
    parts: int = 1


def _down_action(plan: RetrievalPlan, key: ModuleKey) -> Action | None:
    if key.site is Site.DOWN_BLOCK:
        return Action.RUN if plan.down_block_runs[key.block] else Action.SKIP
    if key.site is Site.DOWN_LAYER:
        skipped = plan.down_block_runs[key.block] and not plan.down_layer_runs[key.block][key.layer]
        return Action.SKIP if skipped else Action.RUN
    if key.site is Site.DOWN_SAMPLER:
        skipped = plan.down_block_runs[key.block] and not plan.down_sampler_runs[key.block]
        return Action.SKIP if skipped else Action.RUN
    return None


def retrieval_action(plan: RetrievalPlan, key: ModuleKey) -> Action:
    """What U-Net module ``key`` does on a retrieval step of ``plan``.

    A block that runs skips the layers it does not need; a block that does not run at all is skipped
    whole (its layers are then never called, so they simply run if they are). The module whose output
    enters the up layer consuming skip ``plan.branch`` returns the cached feature.

    Example (SD 1.x/2.x, branch 0: only the last up block runs, from its layer 1 on)::

        >>> sd = UNetLayout.from_counts(down=[(2, True)] * 3 + [(2, False)], up=[(3, True)] * 3 + [(3, False)])
        >>> plan = retrieval_plan(sd, 0)
        >>> [retrieval_action(plan, ModuleKey(Site.UP_LAYER, 3, j, part=1, parts=2)).name for j in range(3)]
        ['SKIP', 'BOUNDARY', 'RUN']
        >>> retrieval_action(plan, ModuleKey(Site.MID)).name
        'SKIP'
    """
    down = _down_action(plan, key)
    if down is not None:
        return down
    b = plan.boundary
    if key.site is Site.MID:
        return Action.BOUNDARY if b.kind == "mid" else Action.SKIP
    if key.site is Site.UP_BLOCK:
        if b == Boundary("up_block", key.block):
            return Action.BOUNDARY
        return Action.RUN if plan.up_block_runs[key.block] else Action.SKIP
    if key.site is Site.UP_LAYER:
        skipped = plan.up_block_runs[key.block] and not plan.up_layer_runs[key.block][key.layer]
        if skipped and b == Boundary("up_layer", key.block, key.layer) and key.part == key.parts - 1:
            return Action.BOUNDARY
        return Action.SKIP if skipped else Action.RUN
    raise ValueError(f"{key} is not a U-Net module site")


def controlnet_retrieval_action(plan: RetrievalPlan, key: ModuleKey) -> Action:
    """What ControlNet module ``key`` does on the U-Net's retrieval step of ``plan``.

    The U-Net adds the ControlNet's residual for skip ``s`` to its skip connection ``s`` and the mid
    residual to the mid block's output. On a retrieval step it consumes the residuals of skips
    ``0..plan.branch``, and the mid residual only when the cached feature *is* the mid block's output (the
    deepest branch: the residual is added to the cached feature). Everything else is skipped; a
    ControlNet never holds a cache.

        >>> sd = UNetLayout.from_counts(down=[(2, True)] * 3 + [(2, False)], up=[(3, True)] * 3 + [(3, False)])
        >>> [controlnet_retrieval_action(retrieval_plan(sd, b), ModuleKey(Site.CONTROL_MID)).name for b in (10, 11)]
        ['SKIP', 'RUN']
    """
    down = _down_action(plan, key)
    if down is not None:
        return down
    if key.site is Site.CONTROL_SKIP:
        return Action.RUN if key.block <= plan.branch else Action.SKIP
    if key.site in (Site.MID, Site.CONTROL_MID):
        return Action.RUN if plan.boundary.kind == "mid" else Action.SKIP
    raise ValueError(f"{key} is not a ControlNet module site")


def skip_name(layout: UNetLayout, skip: int) -> str:
    """Which module produces skip connection ``skip``, e.g. ``down_blocks[1].resnets[0]``."""
    if skip == 0:
        return "conv_in"
    for i, (layers, sampler) in enumerate(layout.down_skip_ids()):
        if skip in layers:
            return f"down_blocks[{i}] layer {layers.index(skip)}"
        if skip == sampler:
            return f"down_blocks[{i}].downsamplers"
    raise ValueError(f"skip {skip} out of range 0..{layout.num_branches - 1}")


def boundary_name(boundary: Boundary) -> str:
    """Human name of the cached feature's source."""
    if boundary.kind == "mid":
        return "mid_block output"
    if boundary.kind == "up_block":
        return f"up_blocks[{boundary.block}] output"
    return f"up_blocks[{boundary.block}] layer {boundary.layer} output"


def branch_table(layout: UNetLayout) -> list[tuple[int, str, str, str]]:
    """Per branch: (id, skip connection source, what a retrieval step runs, cached feature)."""
    rows = []
    for b in range(layout.num_branches):
        plan = retrieval_plan(layout, b)
        rows.append((b, skip_name(layout, b), plan.describe(), boundary_name(plan.boundary)))
    return rows


def branch_table_markdown(layout: UNetLayout) -> str:
    """The README's branch table for ``layout`` as markdown."""
    lines = [
        "| branch | skip connection from | a retrieval step runs | cached feature |",
        "|---|---|---|---|",
    ]
    lines += [f"| {b} | {src} | {runs} | {cached} |" for b, src, runs, cached in branch_table(layout)]
    return "\n".join(lines)
