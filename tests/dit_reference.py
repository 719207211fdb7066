"""An independent reference for DeepCache on transformers (shares no code with DeepCache.engine).

A full step runs the model untouched while torch forward hooks record, for each middle segment (one per block list
the middle touches), the streams entering its first block and leaving its last; the residual is their difference
(for a model with long skips, HunyuanDiT, the output itself is kept and handed back).
A retrieval step swaps the middle blocks' ``forward`` for plain functions (pass the inputs through; the segment's
last block returns the first block's inputs plus the residual), runs the model, and puts the blocks back.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

#: The lists of the cached stack, per class (the facts of ../shared/DIT.md, written here independently).
STACKS = {
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
#: Block classes that return (text, image); (image, text); the others return the image stream alone.
TEXT_FIRST = {"JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock", "Flux2TransformerBlock",
              "AuraFlowJointTransformerBlock", "QwenImageTransformerBlock", "ChromaTransformerBlock"}
IMAGE_FIRST = {"CogView4TransformerBlock", "CogVideoXBlock", "HunyuanVideoTransformerBlock", "MochiTransformerBlock",
               "HunyuanVideoSingleTransformerBlock", "HiDreamImageTransformerBlock"}


def block_lists(model: nn.Module) -> list[list[nn.Module]]:
    return [list(getattr(model, name)) for name in STACKS[type(model).__name__] if len(getattr(model, name, ()) or ())]


def _order(block: nn.Module) -> str:
    name = type(getattr(block, "block", block)).__name__
    return "th" if name in TEXT_FIRST else "ht" if name in IMAGE_FIRST else "h"


def _text_index(block: nn.Module) -> int | None:
    names = list(inspect.signature(type(block).forward).parameters)[1:]  # the class's: an instance's may be swapped
    return names.index("encoder_hidden_states") if "encoder_hidden_states" in names else None


def _inputs(block: nn.Module, args: tuple, kwargs: dict) -> list[Any]:
    image = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    i = _text_index(block)
    text = kwargs.get("encoder_hidden_states", args[i] if i is not None and len(args) > i else None)
    return [image, text]


def _outputs(block: nn.Module, out: Any) -> list[Any]:
    order = _order(block)
    if torch.is_tensor(out):
        return [out, None]
    return [out[1], out[0]] if order == "th" else [out[0], out[1]] if order == "ht" else [out[0], None]


def _pack(block: nn.Module, image: Any, text: Any) -> Any:
    order = _order(block)
    return (text, image) if order == "th" else (image, text) if order == "ht" else image


def segments(model: nn.Module, front: int, back: int) -> list[list[nn.Module]]:
    """The middle blocks of each list (only the lists the middle touches)."""
    flat = [(li, b) for li, blocks in enumerate(block_lists(model)) for b in blocks]
    middle = flat[front : len(flat) - back]
    out: dict[int, list[nn.Module]] = {}
    for li, b in middle:
        out.setdefault(li, []).append(b)
    return list(out.values())


#: Models with long skips, whose middle's output is cached (not its residual): DeepCache's U-Net rule.
CACHE_OUTPUT = ("HunyuanDiT2DModel",)


class ReferenceBranch:
    """One CFG branch's cache in the reference."""

    def __init__(self, model: nn.Module, front: int, back: int) -> None:
        self.segments = segments(model, front, back)
        self.residuals: list[list[Any]] | None = None
        self.output = type(model).__name__ in CACHE_OUTPUT

    def full(self, call: Callable[[], Any]) -> Any:
        seen: dict[int, list[Any]] = {}
        handles = []
        for s, blocks in enumerate(self.segments):
            handles.append(blocks[0].register_forward_pre_hook(
                lambda m, a, k, s=s: seen.__setitem__(("in", s), [None if t is None else t.clone() for t in _inputs(m, a, k)]),
                with_kwargs=True))
            handles.append(blocks[-1].register_forward_hook(
                lambda m, a, k, o, s=s: seen.__setitem__(("out", s), _outputs(m, o)), with_kwargs=True))
        try:
            out = call()
        finally:
            for h in handles:
                h.remove()
        self.residuals = [seen["out", s] if self.output else
                          [None if o is None or i is None else o - i for o, i in zip(seen["out", s], seen["in", s])]
                          for s in range(len(self.segments))]
        return out

    def retrieve(self, call: Callable[[], Any]) -> Any:
        kept: dict[int, list[Any]] = {}
        for s, blocks in enumerate(self.segments):
            r_image, r_text = self.residuals[s]
            for j, block in enumerate(blocks):
                first, last = j == 0, j == len(blocks) - 1

                def forward(*a: Any, block=block, s=s, first=first, last=last, r_image=r_image, r_text=r_text, **k: Any) -> Any:
                    image, text = _inputs(block, a, k)
                    if first:
                        kept[s] = [image, text]
                    if not last:
                        return _pack(block, image, text)
                    if self.output:
                        return _pack(block, r_image, r_text)
                    image, text = kept[s]
                    return _pack(block, image + r_image, None if text is None or r_text is None else text + r_text)

                block.forward = forward
        try:
            return call()
        finally:
            for blocks in self.segments:
                for block in blocks:
                    del block.forward
