"""``deepcache eval``: quality and speed of DeepCache settings against the same pipeline uncached.

Same prompts, same seeds, same scheduler; each setting's images are compared with the baseline's:

* fidelity: PSNR and SSIM (:mod:`DeepCache.metrics`); LPIPS only where the ``lpips`` package and
  its backbone weights are already on disk, otherwise ``n/a``;
* embedded model: task accuracy (the shipped attribute classifier checks shape, colour, background,
  position and size against the prompt) and the Fréchet distance, in that classifier's feature
  space, to real renders of the same prompts;
* other models: CLIP score where CLIP weights are available locally (``--clip-model``).

Models are loaded once; features are extracted here, the metrics themselves are pure functions.

Example::

    $ deepcache eval --variant 3,0 --variant 5,0 --json eval.json
    $ deepcache eval --grid               # intervals 2-5 x branches 0-2
    $ deepcache eval --model ./my-sd-pipeline --prompt "a cat" --steps 25 --variant 3,1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import metrics

ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED_MODEL = ASSETS / "demo-model"
EMBEDDED_CLASSIFIER = ASSETS / "demo-classifier"
DEFAULT_STEPS = 25
MIN_FRECHET_IMAGES = 16
DEFAULT_GUIDANCE = 4.0
GENERIC_PROMPTS: tuple[str, ...] = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at sunset",
    "a bowl of fruit on a wooden table, studio lighting",
    "a red sports car in the snow",
)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One DeepCache configuration; ``interval == 1`` is the uncached baseline."""

    interval: int = 1
    branch: int = 0

    def __post_init__(self) -> None:
        if self.interval < 1 or self.branch < 0:
            raise ValueError(
                f"interval must be >= 1 and branch >= 0, got interval={self.interval}, branch={self.branch}."
            )

    @property
    def is_baseline(self) -> bool:
        return self.interval == 1

    @property
    def label(self) -> str:
        return "baseline" if self.is_baseline else f"I={self.interval} B={self.branch}"

    @classmethod
    def parse(cls, text: str) -> Setting:
        """``"3,0"`` -> interval 3, branch 0; ``"baseline"`` -> no caching.

        >>> Setting.parse("3,1").label
        'I=3 B=1'
        """
        if text.strip().lower() in ("baseline", "none", "1"):
            return cls()
        parts = text.replace("/", ",").split(",")
        try:
            interval, branch = (int(p) for p in parts)
        except ValueError:
            raise ValueError(
                f"cannot parse setting {text!r}; write INTERVAL,BRANCH such as 3,0, or 'baseline'."
            ) from None
        return cls(interval, branch)


def grid_settings(intervals: Sequence[int] = (2, 3, 4, 5), branches: Sequence[int] = (0, 1, 2)) -> list[Setting]:
    """Every (interval, branch) pair, interval-major."""
    return [Setting(i, b) for i in intervals for b in branches]


# -- loading ---------------------------------------------------------------------------------
def load_pipeline(model: str | None = None, device: str = "cpu") -> Any:
    """The embedded demo pipeline (``model=None``, offline) or any diffusers pipeline folder / hub id."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    if model is None:
        if not (EMBEDDED_MODEL / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the embedded demo model is missing from {EMBEDDED_MODEL}; reinstall DeepCache, or rebuild it with "
                "`deepcache train-demo-model --out DeepCache/assets`."
            )
        pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL, local_files_only=True)
    else:
        local = Path(model).expanduser()
        pipe = DiffusionPipeline.from_pretrained(
            str(local) if local.exists() else model, local_files_only=local.exists()
        )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


MARKER = "deepcache-demo.json"


def is_embedded(pipe: Any) -> bool:
    """Whether ``pipe`` is a demo pipeline made by ``deepcache train-demo-model`` (its captions can be checked)."""
    path = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    return path is not None and (Path(str(path)) / MARKER).is_file()


def demo_classifier_path(pipe: Any) -> Path | None:
    """The classifier trained beside a demo pipeline (``../demo-classifier``), if there is one."""
    if not is_embedded(pipe):
        return None
    path = Path(str(pipe.config._name_or_path)).parent / "demo-classifier"
    return path if path.is_dir() else None


def embedded_prompts(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct captions drawn (seeded) from all 720 attribute combinations."""
    from .demo_model.data import all_attributes, caption

    combos = all_attributes()
    if not 1 <= count <= len(combos):
        raise ValueError(f"count must be in 1..{len(combos)}, got {count}.")
    order = np.random.default_rng(seed).permutation(len(combos))[:count]
    return [caption(combos[i]) for i in order]


# -- generation ------------------------------------------------------------------------------
@dataclasses.dataclass
class Generation:
    """Images of one setting, float (N, H, W, 3) in [0, 1], and the wall time of each repeat."""

    setting: Setting
    images: np.ndarray
    seconds: list[float]

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)


def generate(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    setting: Setting,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    batch_size: int = 16,
) -> tuple[np.ndarray, float]:
    """Generate one image per (prompt, seed) pair with ``setting``; returns images and seconds taken."""
    from .helper import DeepCacheSDHelper

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt.")
    helper = DeepCacheSDHelper(pipe=pipe)
    if not setting.is_baseline:
        helper.set_params(cache_interval=setting.interval, cache_branch_id=setting.branch)
        helper.enable()
    chunks: list[np.ndarray] = []
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for first in range(0, len(prompts), batch_size):
                batch = list(prompts[first : first + batch_size])
                generators = [torch.Generator().manual_seed(int(s)) for s in seeds[first : first + batch_size]]
                out = pipe(
                    batch, generator=generators, num_inference_steps=steps, guidance_scale=guidance, output_type="np"
                )
                chunks.append(np.asarray(out.images, dtype=np.float32))
    finally:
        helper.disable()
    return np.concatenate(chunks), time.perf_counter() - start


def run_settings(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: Sequence[Setting],
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    repeats: int = 1,
    batch_size: int = 16,
) -> list[Generation]:
    """Baseline first, then each setting; repeats are interleaved so load changes hit all settings alike."""
    order = [Setting()] + [s for s in settings if not s.is_baseline]
    # Warm-up: one short uncached call (allocations, lazy imports) that is not timed.
    generate(pipe, list(prompts[:1]), list(seeds[:1]), Setting(), steps=2, guidance=guidance)
    results = {s: Generation(s, np.empty(0), []) for s in order}
    for repeat in range(repeats):
        for setting in order:
            images, seconds = generate(pipe, prompts, seeds, setting, steps, guidance, batch_size)
            results[setting].seconds.append(seconds)
            if repeat == 0:
                results[setting].images = images
    return [results[s] for s in order]


# -- features --------------------------------------------------------------------------------
def to_classifier_input(images: np.ndarray, size: int = 32) -> torch.Tensor:
    """float (N, H, W, 3) in [0, 1] -> (N, 3, size, size) in [-1, 1] (area-resized if needed)."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).float().permute(0, 3, 1, 2) * 2.0 - 1.0
    if tensor.shape[-1] != size or tensor.shape[-2] != size:
        tensor = torch.nn.functional.interpolate(tensor, size=(size, size), mode="area")
    return tensor


def classify(classifier: torch.nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class indices (N, attributes) in ``ATTRIBUTE_CLASSES`` order and features (N, D)."""
    from .demo_model.data import ATTRIBUTE_CLASSES

    with torch.no_grad():
        logits, feats = classifier(to_classifier_input(images))
    predicted = np.stack([logits[name].argmax(1).numpy() for name in ATTRIBUTE_CLASSES], axis=1)
    return predicted, feats.numpy().astype(np.float64)


def prompt_labels(prompts: Sequence[str]) -> np.ndarray:
    """Target class indices (N, attributes) parsed from embedded-model captions."""
    from .demo_model.data import ATTRIBUTE_CLASSES, parse_caption

    rows = [parse_caption(p).labels() for p in prompts]
    return np.array([[row[name] for name in ATTRIBUTE_CLASSES] for row in rows], dtype=np.int64)


def reference_images(prompts: Sequence[str], seed: int = 12345) -> np.ndarray:
    """Real procedural renders of the prompts, float (N, 32, 32, 3) in [0, 1] (the Fréchet reference)."""
    from .demo_model.data import parse_caption, render

    rng = np.random.default_rng(seed)
    return np.stack([render(parse_caption(p), rng) for p in prompts]).astype(np.float64) / 255.0


def lpips_model() -> Any | None:
    """An LPIPS network if the ``lpips`` package and its backbone weights are already local, else ``None``."""
    import importlib.util

    if importlib.util.find_spec("lpips") is None or importlib.util.find_spec("torchvision") is None:
        return None
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    if not any(checkpoints.glob("alexnet-*.pth")):
        return None
    import lpips  # type: ignore[import-not-found]

    return lpips.LPIPS(net="alex", verbose=False).eval()


def clip_model(name: str) -> tuple[Any, Any] | None:
    """(CLIPModel, CLIPProcessor) from local files only, or ``None`` when the weights are not on disk."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        return CLIPModel.from_pretrained(name, local_files_only=True).eval(), CLIPProcessor.from_pretrained(
            name, local_files_only=True
        )
    except (OSError, ValueError):
        return None


def clip_scores(model: tuple[Any, Any], images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """CLIP score per image/prompt pair (features extracted here, scored by :func:`metrics.cosine_score`)."""
    clip, processor = model
    pixels = [np.round(img * 255).astype(np.uint8) for img in images]
    inputs = processor(text=list(prompts), images=pixels, return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        image_embeds = _embeds(clip.get_image_features(pixel_values=inputs["pixel_values"]))
        text_embeds = _embeds(
            clip.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        )
    return metrics.cosine_score(image_embeds.numpy(), text_embeds.numpy())


def _embeds(output: Any) -> torch.Tensor:
    """transformers 4.x returns the projected embeddings; 5.x an output whose ``pooler_output`` holds them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# -- scoring ---------------------------------------------------------------------------------
def score(
    generations: Sequence[Generation],
    prompts: Sequence[str],
    classifier: torch.nn.Module | None = None,
    lpips_net: Any | None = None,
    clip: tuple[Any, Any] | None = None,
) -> list[dict[str, Any]]:
    """One row per setting: seconds, speedup, PSNR/SSIM (and LPIPS) vs baseline, task metrics, CLIP score."""
    from .demo_model.data import ATTRIBUTE_CLASSES

    baseline = generations[0]
    if not baseline.setting.is_baseline:
        raise ValueError("the first generation must be the uncached baseline; use run_settings().")
    targets = prompt_labels(prompts) if classifier is not None else None
    reference = classify(classifier, reference_images(prompts))[1] if classifier is not None else None
    rows: list[dict[str, Any]] = []
    for gen in generations:
        row: dict[str, Any] = {
            "setting": gen.setting.label,
            "interval": gen.setting.interval,
            "branch": None if gen.setting.is_baseline else gen.setting.branch,
            "seconds": gen.median_seconds,
            "speedup": baseline.median_seconds / gen.median_seconds,
            "psnr": float(np.mean(metrics.psnr(gen.images, baseline.images))),
            "ssim": float(np.mean(metrics.ssim(gen.images, baseline.images))),
            "lpips": None,
        }
        if lpips_net is not None:
            with torch.no_grad():
                a, b = (to_classifier_input(x, size=x.shape[1]) for x in (gen.images, baseline.images))
                row["lpips"] = float(lpips_net(a, b).mean())
        if classifier is not None and targets is not None and reference is not None:
            predicted, feats = classify(classifier, gen.images)
            row["task_accuracy"] = float((predicted == targets).mean())
            row["attribute_accuracy"] = {
                name: float((predicted[:, k] == targets[:, k]).mean()) for k, name in enumerate(ATTRIBUTE_CLASSES)
            }
            row["all_attributes_accuracy"] = metrics.accuracy(predicted, targets)
            # Too few images for a covariance in FEATURE_DIM dimensions says nothing: report n/a.
            enough = len(prompts) >= MIN_FRECHET_IMAGES
            row["frechet"] = metrics.frechet_distance(feats, reference) if enough else None
        if clip is not None:
            row["clip_score"] = float(np.mean(clip_scores(clip, gen.images, prompts)))
        rows.append(row)
    return rows


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, fmt)


_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("setting", "setting", "s"),
    ("seconds", "seconds", ".2f"),
    ("speedup", "speedup", ".2f"),
    ("psnr", "PSNR dB", ".2f"),
    ("ssim", "SSIM", ".4f"),
    ("lpips", "LPIPS", ".4f"),
    ("task_accuracy", "task acc", ".3f"),
    ("all_attributes_accuracy", "all-attr acc", ".3f"),
    ("frechet", "Frechet", ".2f"),
    ("clip_score", "CLIP score", ".2f"),
)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the rows (columns absent from every row are left out; missing values 'n/a')."""
    columns = [c for c in _COLUMNS if c[0] in ("setting", "lpips") or any(c[0] in r for r in rows)]
    header = "| " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|" + "|".join("---" if key == "setting" else "---:" for key, _, _ in columns) + "|"
    body = ["| " + " | ".join(_cell(r.get(key), fmt) for key, _, fmt in columns) + " |" for r in rows]
    return "\n".join([header, rule, *body])


@dataclasses.dataclass
class EvalResult:
    """Everything ``deepcache eval`` reports; ``to_json()`` is what ``--json`` writes."""

    rows: list[dict[str, Any]]
    meta: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps({"meta": self.meta, "rows": self.rows}, indent=2, default=lambda v: None) + "\n"


def evaluate(
    pipe: Any,
    settings: Sequence[Setting],
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    repeats: int = 1,
    classifier_path: Path | None = None,
    clip_name: str | None = None,
    batch_size: int | None = None,
) -> tuple[EvalResult, list[Generation]]:
    """Generate with every setting and score it; task metrics need a demo pipeline and its classifier."""
    from .demo_model.classifier import load_classifier

    classifier_path = classifier_path or demo_classifier_path(pipe)
    classifier = load_classifier(classifier_path) if classifier_path is not None else None
    clip = clip_model(clip_name) if clip_name else None
    if batch_size is None:  # the tiny demo model batches well; a real SD/SDXL model may not fit 16 at once
        batch_size = 16 if is_embedded(pipe) else 1
    generations = run_settings(pipe, prompts, seeds, settings, steps, guidance, repeats, batch_size)
    rows = score(generations, prompts, classifier, lpips_model(), clip)
    meta = {
        "model": str(getattr(pipe.config, "_name_or_path", "")),
        "embedded": is_embedded(pipe),
        "steps": steps,
        "guidance": guidance,
        "scheduler": type(pipe.scheduler).__name__,
        "prompts": list(prompts),
        "seeds": list(seeds),
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "device": str(getattr(pipe, "device", "cpu")),
        "lpips": "computed" if rows and rows[0]["lpips"] is not None else "n/a (lpips weights not available locally)",
        "clip_score": "computed"
        if clip is not None
        else f"n/a ({'no --clip-model given' if not clip_name else 'weights not available locally'})",
    }
    return EvalResult(rows, meta), generations


# -- command line ----------------------------------------------------------------------------
def add_common_arguments(parser: argparse.ArgumentParser, default_prompts: int) -> None:
    """Options shared by ``deepcache eval`` and ``deepcache demo``."""
    parser.add_argument(
        "--model", help="local folder or hub id of an SD/SDXL pipeline (default: the embedded demo model, offline)"
    )
    parser.add_argument(
        "--variant", action="append", type=Setting.parse, metavar="I,B", help="interval,branch; repeatable"
    )
    parser.add_argument(
        "--prompt", action="append", help="a prompt (repeatable); default: generated captions / generic prompts"
    )
    parser.add_argument(
        "--num-prompts",
        type=int,
        default=default_prompts,
        help=f"number of embedded-model captions (default {default_prompts})",
    )
    parser.add_argument("--seed", type=int, default=0, help="first seed; image k uses seed+k (default 0)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"denoising steps (default {DEFAULT_STEPS})")
    parser.add_argument(
        "--guidance", type=float, default=DEFAULT_GUIDANCE, help=f"guidance scale (default {DEFAULT_GUIDANCE})"
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats per setting; the median is reported")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's choice; use 1 on a busy shared CPU)"
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")


def apply_threads(args: argparse.Namespace) -> None:
    """Honour ``--threads`` before any model runs."""
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}.")
        torch.set_num_threads(args.threads)


def resolve_prompts(args: argparse.Namespace, pipe: Any) -> tuple[list[str], list[int]]:
    """Prompts and one seed per prompt from the parsed options."""
    if args.prompt:
        prompts = list(args.prompt)
    elif is_embedded(pipe):
        prompts = embedded_prompts(args.num_prompts, seed=args.seed)
    else:
        prompts = list(GENERIC_PROMPTS)
    return prompts, [args.seed + k for k in range(len(prompts))]


def main(args: argparse.Namespace) -> int:
    settings = [Setting(i, b) for i, b in ((2, 0), (3, 0), (3, 1), (5, 0))] if not args.variant else args.variant
    if args.grid:
        settings = grid_settings()
    apply_threads(args)
    pipe = load_pipeline(args.model, args.device)
    prompts, seeds = resolve_prompts(args, pipe)
    result, _ = evaluate(
        pipe, settings, prompts, seeds, args.steps, args.guidance, args.repeats, clip_name=args.clip_model
    )
    print(
        f"model: {result.meta['model']}  steps: {args.steps}  scheduler: {result.meta['scheduler']}  "
        f"prompts: {len(prompts)}  threads: {result.meta['torch_threads']}"
    )
    print(format_table(result.rows))
    print(f"LPIPS: {result.meta['lpips']}; CLIP score: {result.meta['clip_score']}")
    if args.json:
        args.json.write_text(result.to_json())
        print(f"wrote {args.json}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``deepcache eval``."""
    parser = subparsers.add_parser(
        "eval",
        help="quality (PSNR, SSIM, task accuracy, Frechet) and speed of DeepCache settings vs no caching",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    add_common_arguments(parser, default_prompts=64)
    parser.add_argument("--grid", action="store_true", help="evaluate intervals 2-5 x branches 0-2")
    parser.add_argument("--clip-model", help="CLIP weights (local folder or cached hub id) for the CLIP score")
    parser.set_defaults(func=main)
