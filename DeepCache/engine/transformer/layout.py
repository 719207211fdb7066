"""The block stack of a diffusion transformer and what a retrieval step runs of it: pure functions.

A DiT runs its blocks in one or more lists, in order (Flux: 19 dual ``transformer_blocks``, then 38
``single_transformer_blocks``). DeepCache for DiTs splits the ``N`` blocks into ``front`` blocks, a middle and
``back`` blocks: a full step runs all and caches the **residual of the middle** (what the middle added to each
stream: the image stream and, where a block carries one, the text stream); a retrieval step runs only the front and
back blocks and adds the cached residual where the middle ends. ``cache_branch_id = b`` is the symmetric split
``front = back = b`` (``b = 0``: the whole stack's residual, fastest; valid ``0..N//2``); ``front_blocks`` /
``back_blocks`` make it asymmetric.

The middle may span several lists, with the model's own work between them (AuraFlow joins text and image into one
stream there): each list's part of the middle is a **segment** with its own residual, taken from where the segment's
first block starts to where its last block ends. On a retrieval step the first block of a segment keeps its inputs
and passes them through, the blocks inside pass through, and the last returns the kept inputs plus the residual, so
whatever the model does between middle blocks (ControlNet residual adds, skip pushes) is replaced by what it did on
the full step, as the residual includes it.

Example (Flux-like: 2 dual blocks, then 4 single blocks)::

    >>> from DeepCache.engine.transformer.layout import DiTLayout, BlockList, roles
    >>> flux = DiTLayout((BlockList("transformer_blocks", 2, "eh"), BlockList("single_transformer_blocks", 4, "eh")))
    >>> flux.num_blocks, flux.num_branches
    (6, 4)
    >>> [r.kind.value for r in roles(flux, 1, 1)]
    ['run', 'only', 'first', 'inner', 'last', 'run']
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

#: What a block returns, per block class: ``"eh"`` = (encoder_hidden_states, hidden_states), ``"he"`` = (hidden_states,
#: encoder_hidden_states), ``"h"`` = hidden_states only (checked against diffusers 0.42 in tests/test_dit_layout.py).
BLOCK_RETURNS: dict[str, str] = {
    "JointTransformerBlock": "eh",  # SD3
    "FluxTransformerBlock": "eh",
    "FluxSingleTransformerBlock": "eh",
    "Flux2TransformerBlock": "eh",
    "Flux2SingleTransformerBlock": "h",
    "AuraFlowJointTransformerBlock": "eh",
    "AuraFlowSingleTransformerBlock": "h",
    "QwenImageTransformerBlock": "eh",
    "ChromaTransformerBlock": "eh",
    "ChromaSingleTransformerBlock": "h",
    "CogView4TransformerBlock": "he",
    "CogVideoXBlock": "he",
    "HunyuanVideoTransformerBlock": "he",
    "HunyuanVideoSingleTransformerBlock": "he",
    "MochiTransformerBlock": "he",
    "HiDreamImageTransformerBlock": "he",  # inside a HiDreamBlock wrapper (the block list holds the wrapper)
    "HiDreamImageSingleTransformerBlock": "h",
    "BasicTransformerBlock": "h",  # PixArt
    "SanaTransformerBlock": "h",
    "HunyuanDiTBlock": "h",
    "WanTransformerBlock": "h",
    "LTXVideoTransformerBlock": "h",
    "AllegroTransformerBlock": "h",
    "Lumina2TransformerBlock": "h",
}

#: The block lists that form the cached stack, in forward order, per transformer class (lists outside it, such as
#: Lumina2's refiners, always run).
TRANSFORMER_STACKS: dict[str, tuple[str, ...]] = {
    "SD3Transformer2DModel": ("transformer_blocks",),
    "FluxTransformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
    "Flux2Transformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
    "PixArtTransformer2DModel": ("transformer_blocks",),
    "SanaTransformer2DModel": ("transformer_blocks",),
    "HunyuanDiT2DModel": ("blocks",),
    "AuraFlowTransformer2DModel": ("joint_transformer_blocks", "single_transformer_blocks"),
    "Lumina2Transformer2DModel": ("layers",),
    "CogView4Transformer2DModel": ("transformer_blocks",),
    "QwenImageTransformer2DModel": ("transformer_blocks",),
    "WanTransformer3DModel": ("blocks",),
    "HunyuanVideoTransformer3DModel": ("transformer_blocks", "single_transformer_blocks"),
    "LTXVideoTransformer3DModel": ("transformer_blocks",),
    "CogVideoXTransformer3DModel": ("transformer_blocks",),
    "MochiTransformer3DModel": ("transformer_blocks",),
    "ChromaTransformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
    "HiDreamImageTransformer2DModel": ("double_stream_blocks", "single_stream_blocks"),
    "AllegroTransformer3DModel": ("transformer_blocks",),
}

#: Transformers with U-Net-like long skips (HunyuanDiT: block ``N-1-j`` pops the skip that block ``j`` pushed). Only
#: symmetric splits keep every skip a back block reads computed, and the middle's **output** is cached, DeepCache's
#: own rule for U-Nets (the deep feature reused as is; the back blocks get fresh skips from the front blocks):
#: measured by tools/hunyuan_skip_choice.py, it is 22-30 % closer to the uncached output than the residual on
#: HunyuanDiT, and 21-53 % farther on a PixArt of the same depth without long skips (docs/hunyuan-skip-choice.json).
LONG_SKIPS = ("HunyuanDiT2DModel",)

SUPPORTED_TRANSFORMERS = tuple(TRANSFORMER_STACKS)


@dataclass(frozen=True)
class BlockList:
    """One list of blocks of the stack: its attribute name, its length and what its blocks return."""

    name: str
    count: int
    returns: str  # "eh", "he" or "h" (BLOCK_RETURNS)


@dataclass(frozen=True)
class DiTLayout:
    """The cached stack of a transformer: its block lists in forward order."""

    lists: tuple[BlockList, ...]
    long_skips: bool = False  # LONG_SKIPS: symmetric splits only, the middle's output is cached

    @property
    def num_blocks(self) -> int:
        return sum(b.count for b in self.lists)

    @property
    def num_branches(self) -> int:
        """How many ``cache_branch_id`` values are valid (``0..N//2``)."""
        return self.num_blocks // 2 + 1

    def split(self, branch: int, front: int | None = None, back: int | None = None) -> tuple[int, int]:
        """The (front, back) block counts for ``cache_branch_id=branch`` or an explicit asymmetric split.

        Raises:
            ValueError: out of range (the message names the valid values).
        """
        n = self.num_blocks
        if front is None and back is None:
            if not 0 <= branch < self.num_branches:
                raise ValueError(f"cache_branch_id must be in [0, {self.num_branches - 1}] for this transformer "
                                 f"({n} blocks: branch b runs the first b and the last b blocks), got {branch}.")
            return branch, branch
        if front is None or back is None:
            raise ValueError("front_blocks and back_blocks go together: pass both (e.g. front_blocks=1, back_blocks=0).")
        if front + back > n:
            raise ValueError(f"front_blocks + back_blocks must be at most the {n} blocks of this transformer, "
                             f"got {front} + {back}.")
        if self.long_skips and front != back:
            raise ValueError("this transformer's back blocks read the long skips of its front blocks (HunyuanDiT): "
                             f"use a symmetric split (cache_branch_id=b, or front_blocks == back_blocks), got "
                             f"front_blocks={front}, back_blocks={back}.")
        return front, back


class Kind(enum.Enum):
    """What a block does on a retrieval step."""

    RUN = "run"  # a front or back block: runs
    FIRST = "first"  # first block of a middle segment: keeps its inputs, passes them through
    INNER = "inner"  # inside a segment: passes its inputs through
    LAST = "last"  # last block of a segment: returns the kept inputs plus the segment's residual
    ONLY = "only"  # a one-block segment: its inputs plus the residual


@dataclass(frozen=True)
class Role:
    """A block's :class:`Kind`, the middle segment it belongs to (``-1`` for RUN), its list's return order, whether
    it is the last block of the last segment (where the full step stores the residuals), whether it is the first
    middle block (where an adaptive retrieval step decides), and whether the segment's output itself is cached
    instead of its residual (long skips)."""

    kind: Kind
    segment: int = -1
    returns: str = "h"
    final: bool = False
    decides: bool = False
    absolute: bool = False


def roles(layout: DiTLayout, front: int, back: int) -> tuple[Role, ...]:
    """The :class:`Role` of every block of the stack, in forward order, for the split ``(front, back)``."""
    n = layout.num_blocks
    middle = range(front, n - back)
    out: list[Role] = []
    start, segment = 0, -1
    last_middle = middle[-1] if len(middle) else -1
    for blocks in layout.lists:
        inside = [i for i in range(start, start + blocks.count) if i in middle]
        if inside:
            segment += 1
        for i in range(start, start + blocks.count):
            if i not in middle:
                out.append(Role(Kind.RUN, returns=blocks.returns))
                continue
            first, last = i == inside[0], i == inside[-1]
            kind = Kind.ONLY if first and last else Kind.FIRST if first else Kind.LAST if last else Kind.INNER
            out.append(Role(kind, segment, blocks.returns, final=i == last_middle, decides=i == middle[0],
                            absolute=layout.long_skips))
        start += blocks.count
    return tuple(out)
