"""``deepcache bench``'s FLOP numbers: one scenario's counts (:func:`scenario_flops`) and ``--flops-only``.

The counting itself is shared with ``deepcache tune``: :mod:`DeepCache.tools.flops`.

Example::

    >>> from DeepCache.tools.bench.scenarios import BenchConfig
    >>> from DeepCache.tools.settings import Setting
    >>> cfg = BenchConfig(model="sd15", variants=(Setting(3, 0),), steps=4, tiny=True, device="cpu")
    >>> [(r.variant, r.pattern, r.ideal_speedup > 1) for r in flops_report(cfg).results]
    [('original', 'FFFF', False), ('I=3, B=0', 'FrrF', True)]
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ...schedules.schedule import schedule_pattern
from ..flops import FlopCache, PatternFlops
from ..kinds.dit_flops import DiTFlopCache
from ..kinds.transformer import TransformerKind
from ..report import environment
from .models import BUILTIN_MODELS, build_pipeline, load_config, tiny_config
from .results import BenchReport, ScenarioResult, report_settings
from .scenarios import BenchConfig, Scenario

__all__ = ["flops_report", "scenario_flops"]


def scenario_flops(counter: FlopCache | DiTFlopCache, scenario: Scenario, pattern: Sequence[bool], guidance_scale: float) -> PatternFlops:
    """The counts and FLOP-ideal speedups of one scenario run with step ``pattern``."""
    setting = scenario.setting
    return counter.for_pattern(pattern, images=scenario.batch_size, latent=counter.latent_size(scenario.height, scenario.width),
                               branch=setting.cache_branch_id, guidance_scale=guidance_scale,
                               uniform_interval=setting.cache_interval if setting.skip_mode == "uniform" else None,
                               front=setting.front_blocks, back=setting.back_blocks)


def flops_report(cfg: BenchConfig) -> BenchReport:
    """FLOP counts and ideal speedups for every (eager) scenario, without building or timing the real model.

    U-Net counts run on the ``meta`` device, so full-size SDXL takes seconds on a CPU. Needs a built-in
    model (or a local model folder, whose configs are read). A transformer folder is loaded on the CPU and counted on
    one real 1-step call per shape (:mod:`DeepCache.tools.kinds.dit_flops`): seconds for small models, minutes and the
    model's memory for a full-size one.
    """
    if cfg.model in BUILTIN_MODELS:
        conf = load_config(cfg.model)
        if cfg.tiny:
            conf = tiny_config(conf)
        unet_cfg, vae_cfg, name = conf["unet"], conf["vae"], cfg.model + ("-tiny" if cfg.tiny else "")
        counter: FlopCache | DiTFlopCache = FlopCache(unet_cfg, vae_cfg)
    elif TransformerKind.claims_folder(Path(cfg.model).expanduser()):  # a real 1-step call counts it: on the CPU
        counter, name = build_pipeline(cfg.model, device="cpu", dtype=torch.float32).kind.flop_counter(), cfg.model
    else:
        import diffusers

        unet_cfg = diffusers.UNet2DConditionModel.load_config(cfg.model, subfolder="unet")
        vae_cfg = diffusers.AutoencoderKL.load_config(cfg.model, subfolder="vae")
        name = cfg.model
        counter = FlopCache(unet_cfg, vae_cfg)
    device = torch.device("meta")
    settings = report_settings(cfg, name, "builtin config" if cfg.model in BUILTIN_MODELS else cfg.model,
                               "n/a (FLOPs only)", device, torch.float32,
                               "transformer" if isinstance(counter, DiTFlopCache) else "unet")
    settings.update(timed="nothing: FLOP counts only", flops_only=True)
    report = BenchReport(settings, environment(device, torch.float32))
    for sc in cfg.scenarios():
        if sc.compiled:  # the same counts as eager
            continue
        pattern = schedule_pattern(sc.setting.for_steps(cfg.steps), cfg.steps)
        result = ScenarioResult.new(name, cfg.steps, sc, pattern)
        result.add_flops(scenario_flops(counter, sc, pattern, cfg.guidance_scale))
        report.results.append(result)
    return report
