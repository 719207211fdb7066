"""HunyuanDiT: cache the middle's residual (DeepCache for DiTs) or its output (DeepCache's U-Net rule: the deep
feature reused as is, the back blocks fed fresh long skips by the front blocks)?

Runs a small seeded HunyuanDiT2DModel, and for contrast a PixArt transformer of the same depth without long skips
(random weights nudged off their zero-initialised gates), on a fixed sequence of inputs that moves like a denoising
trajectory (x_k = x_{k-1} + small noise, timesteps falling), and reports per branch b and interval the mean
relative L1 error of the outputs against the uncached model for both rules. Offline, CPU, about two minutes:

    python tools/hunyuan_skip_choice.py --out docs/hunyuan-skip-choice.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import HunyuanDiT2DModel  # noqa: E402


def build(layers: int, kind: str = "hunyuan") -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "pixart":
        from diffusers import PixArtTransformer2DModel

        model = PixArtTransformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4,
                                         num_layers=layers, cross_attention_dim=32, sample_size=16, patch_size=2,
                                         caption_channels=32).eval()
        model.blocks = model.transformer_blocks  # the same list under the name run() reads
        for p in model.parameters():
            p.data.add_(torch.randn_like(p) * 0.02)
        return model
    model = HunyuanDiT2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4, patch_size=2,
                              activation_fn="gelu-approximate", sample_size=16, hidden_size=32, num_layers=layers,
                              mlp_ratio=4.0, learn_sigma=False, cross_attention_dim=32, cross_attention_dim_t5=32,
                              pooled_projection_dim=16, text_len=8, text_len_t5=8).eval()
    for p in model.parameters():  # away from the zero-initialised gates, so every block contributes
        p.data.add_(torch.randn_like(p) * 0.02)
    return model


def pixart_trajectory(steps: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    common = dict(encoder_hidden_states=torch.randn(2, 8, 32, generator=g),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    calls = []
    for k in range(steps):
        x = x + 0.1 * torch.randn(x.shape, generator=g)
        calls.append({**common, "hidden_states": x.clone(), "timestep": torch.full((2,), 1000.0 * (1 - k / steps))})
    return calls


def trajectory(steps: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    common = dict(encoder_hidden_states=torch.randn(2, 8, 32, generator=g), text_embedding_mask=torch.ones(2, 8),
                  encoder_hidden_states_t5=torch.randn(2, 8, 32, generator=g), text_embedding_mask_t5=torch.ones(2, 8),
                  image_meta_size=torch.tensor([[16, 16, 16, 16, 0, 0]] * 2, dtype=torch.float32),
                  style=torch.zeros(2, dtype=torch.long), image_rotary_emb=None, return_dict=False)
    calls = []
    for k in range(steps):
        x = x + 0.1 * torch.randn(x.shape, generator=g)
        calls.append({**common, "hidden_states": x.clone(), "timestep": torch.full((2,), 1000.0 * (1 - k / steps))})
    return calls


def rope(model: HunyuanDiT2DModel) -> tuple:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    return get_2d_rotary_pos_embed(model.inner_dim // model.num_heads, ((0, 0), (8, 8)), (8, 8))


def run(model, calls, b: int, interval: int, rule: str | None) -> list[torch.Tensor]:
    blocks = list(model.blocks)
    n = len(blocks)
    first, last = blocks[b], blocks[n - b - 1]
    state: dict = {}
    outs = []
    for k, kw in enumerate(calls):
        full = rule is None or k % interval == 0
        handles = []
        if rule is not None and full:
            handles.append(first.register_forward_pre_hook(
                lambda m, a, kws: state.__setitem__("in", kws.get("hidden_states", a[0] if a else None).clone()),
                with_kwargs=True))
            handles.append(last.register_forward_hook(lambda m, a, kws, o: state.__setitem__("out", o.clone()),
                                                       with_kwargs=True))
        elif rule is not None:
            for i, block in enumerate(blocks[b : n - b]):
                def forward(*a, i=i, **kws):
                    x = kws.get("hidden_states", a[0] if a else None)
                    if i == 0:
                        state["now"] = x
                    if i < n - 2 * b - 1:
                        return x
                    return state["out"] if rule == "output" else state["now"] + (state["out"] - state["in"])
                block.forward = forward
        try:
            with torch.no_grad():
                outs.append(model(**kw)[0])
        finally:
            for h in handles:
                h.remove()
            for block in blocks:
                block.__dict__.pop("forward", None)
    return outs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for kind in ("hunyuan", "pixart"):
        model = build(args.layers, kind)
        if kind == "hunyuan":
            calls = trajectory(args.steps)
            for kw in calls:
                kw["image_rotary_emb"] = rope(model)
        else:
            calls = pixart_trajectory(args.steps)
        plain = run(model, calls, 0, 1, None)
        for b in range(0, args.layers // 2, 2):
            for interval in (2, 3, 5):
                row = {"model": kind, "branch": b, "interval": interval}
                for rule in ("residual", "output"):
                    got = run(model, calls, b, interval, rule)
                    row[rule] = float(sum(((g - p).abs().mean() / p.abs().mean()) for g, p in zip(got, plain)) / len(got))
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"layers": args.layers, "steps": args.steps, "weights": "random, seeded",
                                        "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
