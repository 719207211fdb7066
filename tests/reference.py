"""Test-only references, written independently of DeepCache's implementation.

``OriginalRule`` re-implements the *rule* of the original DeepCache 0.1.1 helper: wrap every
down/mid/up module, remember every output at full steps, and on other steps return the remembered
output of every module deeper than the branch (block = id // 3, layer = id % 3, up side
mirrored). Step indices are counted per generation, as the original does for a fresh helper and a
full-length schedule. Our helper must give bit-identical results wherever that rule is correct.

``LayerProbe`` records which down/up layers and the mid block really computed, per U-Net call.
"""

from __future__ import annotations

import torch
from torch import nn


def _copy(value):
    if torch.is_tensor(value):
        return value.clone()
    if isinstance(value, tuple):
        return type(value)(_copy(v) for v in value)
    return value


class OriginalRule:
    def __init__(self, unet: nn.Module, interval: int, branch: int, copy: bool = False) -> None:
        self.unet, self.interval, self.copy = unet, interval, copy
        self.block, self.layer = branch // 3, branch % 3
        self.step = -1
        self.memory: dict = {}
        self.restore: list = []
        self.handle = unet.register_forward_pre_hook(self._count)
        n_up = len(unet.up_blocks)
        for i, block in enumerate(unet.down_blocks):
            for j, attn in enumerate(getattr(block, "attentions", None) or []):
                self._wrap(attn, ("down", "attn", i, j))
            for j, resnet in enumerate(block.resnets):
                self._wrap(resnet, ("down", "resnet", i, j))
            for sampler in block.downsamplers or []:
                self._wrap(sampler, ("down", "sampler", i, len(block.resnets)))
            self._wrap(block, ("down", "block", i, 0))
        self._wrap(unet.mid_block, ("mid", "mid", 0, 0))
        for u, block in enumerate(unet.up_blocks):
            m, n = n_up - u - 1, len(block.resnets)
            for j, attn in enumerate(getattr(block, "attentions", None) or []):
                self._wrap(attn, ("up", "attn", m, n - j - 1))
            for j, resnet in enumerate(block.resnets):
                self._wrap(resnet, ("up", "resnet", m, n - j - 1))
            for sampler in block.upsamplers or []:
                self._wrap(sampler, ("up", "sampler", m, 0))
            self._wrap(block, ("up", "block", m, 0))

    def _count(self, module, args):
        self.step += 1

    def _skipped(self, kind: str, block: int, layer: int) -> bool:
        if self.step % self.interval == 0:
            return False
        if kind == "mid" or block > self.block:
            return True
        if block < self.block:
            return False
        return layer >= self.layer if kind == "down" else layer > self.layer

    def _wrap(self, module: nn.Module, key: tuple) -> None:
        original = module.forward

        def forward(*args, **kwargs):
            if self._skipped(key[0], key[2], key[3]):
                return _copy(self.memory[key]) if self.copy else self.memory[key]
            out = original(*args, **kwargs)
            self.memory[key] = _copy(out) if self.copy else out
            return out

        module.forward = forward
        self.restore.append(module)

    def remove(self) -> None:
        self.handle.remove()
        for module in self.restore:
            del module.forward


class LayerProbe:
    """Records, per U-Net call, the skip ids whose down layer / up layer computed, and the mid block."""

    def __init__(self, unet: nn.Module) -> None:
        self.calls: list[dict[str, set]] = []
        self.handles = [unet.register_forward_pre_hook(lambda m, a: self.calls.append({k: set() for k in ("down", "up", "mid", "down_attn", "up_attn")}))]
        skip = 1
        for block in unet.down_blocks:
            for j, resnet in enumerate(block.resnets):
                self._probe(resnet.norm1, "down", skip)
                self._probe_attention(block, j, "down", skip)
                skip += 1
            for sampler in block.downsamplers or []:
                self._probe(sampler.conv, "down", skip)
                skip += 1
        self._probe(unet.mid_block.resnets[0].norm1, "mid", 0)
        skip -= 1
        for block in unet.up_blocks:
            for j, resnet in enumerate(block.resnets):
                self._probe(resnet.norm1, "up", skip)
                self._probe_attention(block, j, "up", skip)
                skip -= 1
        self.num_branches = sum(len(b.resnets) for b in unet.up_blocks)

    def _probe(self, leaf: nn.Module, kind: str, skip: int) -> None:
        self.handles.append(leaf.register_forward_pre_hook(lambda m, a: self.calls[-1][kind].add(skip)))

    def _probe_attention(self, block: nn.Module, j: int, kind: str, skip: int) -> None:
        attentions = getattr(block, "attentions", None)
        if attentions is not None and j < len(attentions):
            leaf = next(m for m in attentions[j].modules() if list(m.parameters(recurse=False)))
            self.handles.append(leaf.register_forward_pre_hook(lambda m, a: self.calls[-1][kind + "_attn"].add(skip)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
