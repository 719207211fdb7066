"""Which transformers DeepCache caches and which of their modules it wraps: pure reading of a model's structure.

:func:`dit_layout` turns a supported transformer into the :class:`~.dit_layout.DiTLayout` its retrieval plan is
computed on; :func:`transformer_blocks` lists the wrapped blocks in forward order (the order the roles are indexed).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from .layout import BLOCK_RETURNS, LONG_SKIPS, TRANSFORMER_STACKS, BlockList, DiTLayout


def _block_class(block: nn.Module) -> str:
    inner = getattr(block, "block", None)  # HiDreamBlock wraps the real block
    return type(inner).__name__ if type(block).__name__ == "HiDreamBlock" and inner is not None else type(block).__name__


def is_transformer(model: Any) -> bool:
    """Whether ``model`` is a transformer class DeepCache knows (by class name, subclasses included)."""
    return isinstance(model, nn.Module) and any(c.__name__ in TRANSFORMER_STACKS for c in type(model).__mro__)


def _stack_name(model: nn.Module) -> str:
    return next(c.__name__ for c in type(model).__mro__ if c.__name__ in TRANSFORMER_STACKS)


#: The oldest diffusers whose transformers DeepCache caches (Flux's single blocks take both streams since 0.35).
MIN_DIFFUSERS = (0, 35)


def _diffusers_version() -> tuple[int, int]:
    import diffusers

    return tuple(int(x) for x in diffusers.__version__.split(".")[:2] if x.isdigit())  # type: ignore[return-value]


def check_supported_transformer(model: Any) -> None:
    """Raise ``TypeError`` naming the supported classes if ``model`` cannot be cached."""
    if is_transformer(model) and _diffusers_version() < MIN_DIFFUSERS:
        raise TypeError(f"DeepCache caches transformers with diffusers >= {'.'.join(map(str, MIN_DIFFUSERS))} "
                        "(block signatures changed there): pip install -U diffusers.")
    if not is_transformer(model):
        raise TypeError(
            f"DeepCache cannot cache a {type(model).__name__}: supported transformers are "
            f"{', '.join(TRANSFORMER_STACKS)} (pass a diffusers pipeline whose `transformer` is one of them, or the "
            "transformer itself)."
        )
    for name in TRANSFORMER_STACKS[_stack_name(model)]:
        for block in getattr(model, name, None) or ():
            if _block_class(block) not in BLOCK_RETURNS:
                raise TypeError(f"DeepCache cannot cache this {type(model).__name__}: its {name} hold a "
                                f"{_block_class(block)}, whose outputs DeepCache does not know.")


def dit_layout(model: nn.Module) -> DiTLayout:
    """The cached block stack of a (supported) transformer."""
    check_supported_transformer(model)
    lists = []
    for name in TRANSFORMER_STACKS[_stack_name(model)]:
        blocks = getattr(model, name, None) or ()
        if len(blocks):
            lists.append(BlockList(name, len(blocks), BLOCK_RETURNS[_block_class(blocks[0])]))
    layout = DiTLayout(tuple(lists), long_skips=_stack_name(model) in LONG_SKIPS)
    if layout.num_blocks == 0:
        raise TypeError(f"DeepCache cannot cache this {type(model).__name__}: it has no transformer blocks.")
    return layout


def transformer_blocks(model: nn.Module) -> list[tuple[tuple[str, int], nn.Module]]:
    """((list name, index), block) for every block of the cached stack, in forward order."""
    return [((name, i), block) for name in TRANSFORMER_STACKS[_stack_name(model)]
            for i, block in enumerate(getattr(model, name, None) or ())]


def _position(fn: Callable, prefix: str) -> int | None:
    """The positional index (without ``self``) of the first parameter of ``fn`` whose name starts with ``prefix``."""
    try:
        names = [p.name for p in inspect.signature(fn).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return None
    return next((i for i, n in enumerate(names) if n.startswith(prefix)), None)


def conditioning_reader(model: nn.Module) -> Callable[[tuple, dict], Any]:
    """``read(args, kwargs)``: the conditioning tensor of a call of ``model`` (a CFG branch's key): its first
    ``encoder_hidden_states*`` argument, by keyword or at its position in ``model.forward``."""
    position = _position(model.forward, "encoder_hidden_states")

    def read(args: tuple, kwargs: dict) -> Any:
        cond = next((v for k, v in kwargs.items() if k.startswith("encoder_hidden_states")), None)
        if cond is None and position is not None and len(args) > position:
            cond = args[position]
        return cond

    return read
