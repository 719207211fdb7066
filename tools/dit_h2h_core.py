"""The measuring core of ``tools/dit_head_to_head.py``: MACs that actually ran, one generation, the metrics.

**MACs** (multiply-accumulates; FLOPs = 2 x MACs, as :mod:`DeepCache.tools.kinds.dit_flops` counts them with torch's
:func:`DeepCache.tools.flops.count_flops_by_module`: matrix multiplies and attention, CPU attention included,
nothing elementwise) are counted by forward hooks on what
really runs, not assumed from a schedule:

* every ``nn.Linear`` inside the transformer adds ``rows x in x out`` for the rows it got (its input's size / ``in``);
* every attention module adds its own matmuls (``QK^T`` and ``AV``, measured once per call by that counter)
  when its ``to_q`` projection runs, scaled by the batch;
* whatever else the counter sees at the transformer's top level (none on Flux) is added per transformer call.

Hooks on whole blocks would over-count: diffusers' cache hooks replace a skipped block's ``forward`` (and TaylorSeer an
attention's) with a pass-through or a forecast, and ``nn.Module`` forward hooks still fire on it. The leaves only run
when the work is done. :func:`count_table` checks that the hooks reproduce ``FlopCounterMode``'s total of one
uncached call exactly.

Example::

    table = count_table(pipe, prompt="a red circle", steps=1)
    with MacCounter(pipe.transformer, table) as counter:
        image, macs, seconds = generate(pipe, "a red circle", seed=0, steps=28, cfg=4.0, counter=counter)
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from DeepCache.tools.demo_model import DIT_CALL_KWARGS as CALL_KWARGS


@dataclass(frozen=True)
class CountTable:
    """MACs of one uncached transformer call at ``batch``: the total, per block, and the hooks' non-Linear parts."""

    batch: int
    per_call: int
    blocks: tuple[int, ...]  # transformer_blocks then single_transformer_blocks
    attention_self: dict[str, int]  # attention module name -> its own (non-Linear) MACs per call
    top_rest: int  # MACs at the top level not inside any hooked module (0 on Flux)


def call_kwargs(prompt: str | list[str], cfg: float) -> dict[str, Any]:
    """The pipeline's prompt and guidance arguments: true CFG (a separate uncond call) when ``cfg > 1``."""
    if cfg > 1:
        negative = [""] * len(prompt) if isinstance(prompt, list) else ""
        return {"prompt": prompt, "negative_prompt": negative, "true_cfg_scale": cfg, **CALL_KWARGS}
    return {"prompt": prompt, **CALL_KWARGS}


def block_names(transformer: nn.Module) -> list[str]:
    """The stack's blocks in the order they run (``transformer_blocks.i``, then ``single_transformer_blocks.i``)."""
    names = []
    for attr in ("transformer_blocks", "single_transformer_blocks"):
        names += [f"{attr}.{i}" for i in range(len(getattr(transformer, attr, ())))]
    return names


def count_table(pipe: Any, prompt: str = "a small red circle on a blue background, top left") -> CountTable:
    """Count one uncached transformer call (batch 1) with ``FlopCounterMode``; split it for the hooks."""
    from DeepCache.tools.flops import count_flops_by_module

    transformer = pipe.transformer
    captured: dict[str, Any] = {}

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.setdefault("args", args)
        captured.setdefault("kwargs", kwargs)

    handle = transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        pipe(**call_kwargs(prompt, 1.0), num_inference_steps=1, generator=torch.Generator().manual_seed(0),
             output_type="latent")
    finally:
        handle.remove()
    flops = count_flops_by_module(lambda: transformer(*captured["args"], **captured["kwargs"]))
    top = type(transformer).__name__
    batch = int(captured["kwargs"]["hidden_states"].shape[0])
    macs = {name[len(top) + 1:]: value // 2 for name, value in flops.items() if name.startswith(top + ".")}
    own = dict(macs)
    inside = 0  # MACs of the counted modules directly under the top
    for name, value in macs.items():  # each counted module's MACs leave its nearest counted ancestor's own count
        parent = _nearest_counted(name, macs)
        if parent is None:
            inside += value
        else:
            own[parent] -= value
    attention_self: dict[str, int] = {}
    for name, value in own.items():
        module = transformer.get_submodule(name)
        if value and not isinstance(module, nn.Linear):
            if not hasattr(module, "to_q"):
                raise RuntimeError(f"{name} ({type(module).__name__}) does matmuls outside a Linear and is not an "
                                   "attention module: the MAC hooks cannot count it.")
            attention_self[name] = value
    return CountTable(batch, flops.get(top, 0) // 2, tuple(macs.get(n, 0) for n in block_names(transformer)),
                      attention_self, flops.get(top, 0) // 2 - inside)


def _nearest_counted(name: str, counted: dict[str, int]) -> str | None:
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:end]) in counted:
            return ".".join(parts[:end])
    return None


class MacCounter:
    """Forward hooks that add up the MACs the transformer really runs (see the module docstring)."""

    def __init__(self, transformer: nn.Module, table: CountTable) -> None:
        self.transformer, self.table = transformer, table
        self.macs = 0
        self.calls = 0
        self._handles: list[Any] = []

    def __enter__(self) -> MacCounter:
        for name, module in self.transformer.named_modules():
            if isinstance(module, nn.Linear):
                self._handles.append(module.register_forward_hook(self._linear))
        for name, own in self.table.attention_self.items():
            to_q = self.transformer.get_submodule(name).to_q
            self._handles.append(to_q.register_forward_hook(self._attention(own)))
        self._handles.append(self.transformer.register_forward_hook(self._top))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _linear(self, module: nn.Linear, args: tuple, output: torch.Tensor) -> None:
        self.macs += args[0].numel() * module.out_features

    def _attention(self, own: int) -> Any:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.macs += own * args[0].shape[0] // self.table.batch
        return hook

    def _top(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.calls += 1
        self.macs += self.table.top_rest

    def take(self) -> tuple[int, int]:
        """(MACs, transformer calls) since the last ``take``."""
        out = (self.macs, self.calls)
        self.macs = self.calls = 0
        return out


def generate(pipe: Any, prompt: str, seed: int, *, steps: int, cfg: float,
             counter: MacCounter | None = None) -> tuple[np.ndarray, int, float]:
    """One image (32, 32, 3) in [0, 1], the transformer MACs it took and its wall seconds."""
    images, macs, seconds = generate_batch(pipe, [(prompt, seed)], steps=steps, cfg=cfg, counter=counter)
    return images[0], macs, seconds


def generate_batch(pipe: Any, items: Sequence[tuple[str, int]], *, steps: int, cfg: float,
                   counter: MacCounter | None = None) -> tuple[np.ndarray, int, float]:
    """Images (N, 32, 32, 3) of (prompt, seed) pairs in one call (each pair's noise from its own generator, as alone),
    the transformer MACs of the whole call and its wall seconds."""
    if counter is not None:
        counter.take()
    prompts = [p for p, _ in items]
    started = time.perf_counter()
    result = pipe(**call_kwargs(prompts if len(items) > 1 else prompts[0], cfg), num_inference_steps=steps,
                  generator=[torch.Generator().manual_seed(seed) for _, seed in items], output_type="np")
    seconds = time.perf_counter() - started
    macs = counter.take()[0] if counter is not None else 0
    return np.asarray(result.images, dtype=np.float64), macs, seconds


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Swallow stdout (peers print calibration results and statistics); yields what was printed."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield buffer


def image_metrics(images: np.ndarray, reference: np.ndarray, prompts: Sequence[str],
                  classifier: nn.Module | None) -> dict[str, Any]:
    """PSNR/SSIM vs the reference (mean, min), task accuracy and the Fréchet distance of the classifier's features.

    ``psnr`` is the mean of per-image PSNR with identical images counted as 100 dB, so a method that leaves most
    images untouched scores high whatever it does to the rest: ``untouched`` counts those images and
    ``psnr_of_mean_mse`` (the PSNR of the mean squared error over all images, 100 if all are identical) does not
    reward them.
    """
    from DeepCache.tools.metrics import frechet_distance, psnr, ssim

    values = psnr(images, reference)
    finite = np.minimum(values, 100.0)  # identical images: inf, capped for means
    mse = float(np.mean(10.0 ** (-values / 10.0)))  # the per-image MSEs psnr() took (0 for identical images)
    row: dict[str, Any] = {"psnr": float(finite.mean()), "psnr_min": float(finite.min()),
                           "psnr_of_mean_mse": min(100.0, float(10 * np.log10(1 / mse))) if mse > 0 else 100.0,
                           "untouched": int(np.isinf(values).sum()), "ssim": float(np.mean(ssim(images, reference)))}
    if classifier is not None:
        from DeepCache.tools.scoring import classify, prompt_labels

        predicted, features = classify(classifier, images)
        _, ref_features = classify(classifier, reference)
        row["task_acc"] = float((predicted == prompt_labels(prompts)).mean())
        row["frechet"] = float(frechet_distance(features, ref_features)) if len(images) >= 16 else None
    return row


def mac_summary(macs: Sequence[int], uncached: int) -> dict[str, float]:
    """Mean MAC fraction of uncached and its per-image spread."""
    fractions = np.asarray(macs, dtype=np.float64) / uncached
    return {"mac_fraction": float(fractions.mean()), "mac_min": float(fractions.min()),
            "mac_max": float(fractions.max())}
