"""Small tensor helpers of the engine: placeholders, version stamps, copies, the relative L1 change.

Pure functions on tensors and pytrees; no module, no state.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch.utils import _pytree as pytree

#: Set to 1 to fill placeholders with NaN: a placeholder that some computation consumes then poisons the
#: output, so tests catch it (the test-suite runs with it on). Read when a generation starts.
NAN_PLACEHOLDERS_ENV = "DEEPCACHE_NAN_PLACEHOLDERS"

#: The tree structure and, per leaf, (shape, dtype, device) of a tensor or (None, value, None) of anything else.
Spec = tuple[pytree.TreeSpec, list]


def nan_placeholders() -> bool:
    """Whether ``DEEPCACHE_NAN_PLACEHOLDERS`` asks for NaN-filled placeholders (debugging aid)."""
    return os.environ.get(NAN_PLACEHOLDERS_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def tensor_spec(out: Any) -> Spec:
    """What :func:`placeholder` needs to make a stand-in for ``out``."""
    leaves, spec = pytree.tree_flatten(out)
    return spec, [(tuple(x.shape), x.dtype, x.device) if torch.is_tensor(x) else (None, x, None) for x in leaves]


def placeholder(spec: Spec, poison: bool) -> Any:
    """An output of the given spec whose tensors are uninitialised (or NaN where ``poison``)."""
    treespec, leaves = spec
    values = []
    for shape, dtype, device in leaves:
        if shape is None:
            values.append(dtype)
        elif poison and dtype.is_floating_point:
            values.append(torch.full(shape, math.nan, dtype=dtype, device=device))
        else:
            values.append(torch.empty(shape, dtype=dtype, device=device))
    return pytree.tree_unflatten(values, treespec)


def versions(tree: Any) -> tuple[int, ...] | None:
    """The version counters of the tensors in ``tree`` (None if untrackable: inference-mode tensors)."""
    try:
        return tuple(t._version for t in pytree.tree_leaves(tree) if torch.is_tensor(t))
    except RuntimeError:  # inference tensors (torch.inference_mode) have no version counter
        return None


def clone(tree: Any) -> Any:
    """A copy of every tensor in ``tree``."""
    return pytree.tree_map(lambda x: x.clone() if torch.is_tensor(x) else x, tree)


def nbytes(tree: Any) -> int:
    """Bytes held by the tensors in ``tree``."""
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(tree) if torch.is_tensor(t))


def input_key(sample: Any) -> tuple | None:
    """(shape, dtype, device) of a U-Net's input sample: a cache is valid only for inputs with the same key."""
    return (tuple(sample.shape), sample.dtype, sample.device) if torch.is_tensor(sample) else None


def hidden_states(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The first positional (or ``hidden_states``) tensor argument of a block call."""
    x = args[0] if args else kwargs.get("hidden_states")
    return x if torch.is_tensor(x) else None


def relative_l1(x: torch.Tensor, reference: torch.Tensor) -> float:
    """``mean|x - reference| / mean|reference|``: one reduction and one host read."""
    x, reference = x.float(), reference.float()
    return float((x - reference).abs().mean() / reference.abs().mean().clamp_min(1e-12))
