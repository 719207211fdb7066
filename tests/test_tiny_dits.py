"""The tiny DiT fixtures build, run deterministically, and BLOCK_FACTS matches what the models do (by running)."""

from __future__ import annotations

import inspect

import pytest
import torch

from .tiny_dits import BLOCK_FACTS, TINY_DITS, sample_of

NAMES = sorted(TINY_DITS)
LATENT_KEYS = {"hidden_states", "timestep", "timesteps"}


def test_every_class_has_facts():
    assert set(BLOCK_FACTS) == set(TINY_DITS)


@pytest.mark.parametrize("name", NAMES)
def test_fixture_deterministic_and_conditioning_shared(name):
    model, inputs = TINY_DITS[name]()
    assert not model.training
    a, b, c = inputs(0), inputs(0), inputs(1)
    for key in a:
        if key in LATENT_KEYS:
            continue
        assert a[key] is c[key], f"{key} must be the same object at every step"
    t_key = "timesteps" if "timesteps" in a else "timestep"
    assert a[t_key].shape[0] == 2 and not torch.equal(a[t_key], c[t_key])
    assert torch.equal(a["hidden_states"], b["hidden_states"]) and not torch.equal(a["hidden_states"],
                                                                                   c["hidden_states"])
    with torch.no_grad():
        out_a, out_b, out_c = (sample_of(model(**x)) for x in (a, b, c))
    assert out_a.shape[0] == 2 and torch.isfinite(out_a).all()
    assert torch.equal(out_a, out_b)
    assert not torch.equal(out_a, out_c)


def _shape(x):
    return None if x is None else tuple(x.shape)


@pytest.mark.parametrize("name", NAMES)
def test_block_facts_by_running(name):
    facts = BLOCK_FACTS[name]
    model, inputs = TINY_DITS[name]()
    order, seen = [], {}

    for spec in facts["lists"]:
        blocks = getattr(model, spec["name"])
        assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) == spec["count"], spec["name"]
        for index in (0, len(blocks) - 1):
            def hook(mod, args, kwargs, out, spec=spec, index=index):
                if index == 0 and spec["name"] not in order:
                    order.append(spec["name"])
                seen[(spec["name"], index)] = (mod, args, kwargs, out)

            blocks[index].register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(**inputs(0))
    assert order == [spec["name"] for spec in facts["lists"]], "forward order"

    for spec in facts["lists"]:
        for index in (0, spec["count"] - 1):
            mod, args, kwargs, out = seen[(spec["name"], index)]
            assert type(mod).__name__ == spec["block"].split("(")[0]
            params = list(inspect.signature(mod.forward).parameters)
            assert params == spec["params"]
            assert len(args) == spec["positional"], "how the model calls the block"
            bound = inspect.signature(mod.forward).bind(*args, **kwargs).arguments
            stream = bound["hidden_states"]
            text = bound.get(spec["text"]) if spec["text"] else None
            image = bound.get(spec["image"]) if spec["image"] else None
            assert stream is (image if spec["stream"] in ("image", "joint") else text)
            if spec["returns"] == "h":
                assert isinstance(out, torch.Tensor) and out.shape == stream.shape
                continue
            assert isinstance(out, tuple) and len(out) == 2
            out_text, out_image = out if spec["returns"] == "eh" else out[::-1]
            assert image.shape[1] != text.shape[1], "streams must be told apart by shape"
            assert _shape(out_image) == _shape(image)
            last = index == spec["count"] - 1
            if last and spec["last_text"] == "None":
                assert out_text is None
            elif last and spec["last_text"] == "input":
                assert out_text is text
            else:
                assert _shape(out_text) == _shape(text) and out_text is not text
