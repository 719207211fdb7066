"""The tiny DiT pipelines run offline and deterministically, with the transformer call patterns engines rely on."""

from __future__ import annotations

import pytest
import torch

from .tiny_dit_pipelines import TINY_DIT_PIPELINES, output_of

# per step: the calls in order, "c" cond, "u" uncond, "cu" one batched [uncond, cond] call; "2" marks transformer_2
PATTERNS = {
    "FluxPipeline": ["c u"] * 4,
    "StableDiffusion3Pipeline": ["cu"] * 4,
    "PixArtSigmaPipeline": ["cu"] * 4,
    "SanaPipeline": ["cu"] * 4,
    "WanPipeline": ["c u"] * 4,
    "WanPipeline2.2": ["c u", "c u", "c2 u2", "c2 u2"],
    "CogView4Pipeline": ["c u"] * 4,
    "QwenImagePipeline": ["c u"] * 4,
    "Lumina2Pipeline": ["c u", "c u", "c", "c"],  # cfg_trunc_ratio=0.5 drops the uncond call late
}


def _run(name):
    pipe, kwargs = TINY_DIT_PIPELINES[name]()
    calls = []
    for attr in ("transformer", "transformer_2"):
        model = getattr(pipe, attr, None)
        if model is not None:
            def hook(mod, args, kw, attr=attr):
                hidden = kw["hidden_states"] if "hidden_states" in kw else args[0]
                t = kw.get("timestep", kw.get("timesteps"))
                calls.append((attr, hidden.shape[0], kw["encoder_hidden_states"], float(t.flatten()[0])))

            model.register_forward_pre_hook(hook, with_kwargs=True)
    return output_of(pipe(**kwargs)), calls, kwargs


def _same(ehs, embeds):
    """The pipeline may pass the user's tensor or a copy (CogView4, Qwen-Image, Lumina2 copy)."""
    return ehs is embeds or (ehs.shape == embeds.shape and torch.equal(ehs, embeds))


@pytest.mark.parametrize("name", sorted(TINY_DIT_PIPELINES))
def test_pipeline_runs_deterministically_with_its_call_pattern(name):
    out, calls, kwargs = _run(name)
    again, _, _ = _run(name)
    assert torch.isfinite(out).all() and torch.equal(out, again)

    steps = []
    for attr, batch, ehs, t in calls:
        if not steps or steps[-1][0] != t:
            steps.append((t, []))
        second = "2" if attr == "transformer_2" else ""
        if batch == 2:
            steps[-1][1].append("cu" + second)
        else:
            assert batch == 1
            role = "c" if _same(ehs, kwargs["prompt_embeds"]) else "u" if _same(ehs, kwargs["negative_prompt_embeds"]) else "?"
            steps[-1][1].append(role + second)
    assert [" ".join(s[1]) for s in steps] == PATTERNS[name]
    # the conditioning objects are the same at every step (one object per branch)
    branches = {}
    for attr, batch, ehs, t in calls:
        branches.setdefault((attr, batch, ehs.shape), set()).add(id(ehs))
    assert all(len(ids) <= 2 for ids in branches.values())
    if all(batch == 2 for _, batch, _, _ in calls):
        assert len({id(ehs) for _, _, ehs, _ in calls}) == 1
