"""Which prompts a tool runs when none are given, the same for ``deepcache demo``, ``eval`` and ``tune``.

On the embedded demo model: ``count`` distinct captions drawn (seeded) from its 720 attribute
combinations, so ``demo``'s six prompts are the first six of ``eval``'s 64. On any other model: the
first ``count`` of a few generic prompts. Image ``k`` uses seed ``first_seed + k``. ``tune`` calibrates
on other prompts (:func:`calibration_prompts`): the next captions of the same draw, or a second generic list.
``generate`` and ``eval --prompts`` read a prompts file (:func:`read_prompt_file`: ``.txt``, ``.jsonl``, ``.csv``).

Example::

    >>> from DeepCache.tools.prompts import choose_prompts, embedded_prompts
    >>> embedded_prompts(2)
    ['a small green triangle on a black background, bottom right', 'a large red square on a green background, bottom left']
    >>> choose_prompts(embedded=True, count=6) == embedded_prompts(64)[:6]
    True
    >>> choose_prompts(embedded=False, count=2, given=["a cat"])
    ['a cat']
    >>> calibration_prompts(embedded=True, count=2, exclude=embedded_prompts(6)) == embedded_prompts(8)[6:]
    True
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["GENERIC_CALIBRATION_PROMPTS", "GENERIC_PROMPTS", "PROMPT_FILE_FORMATS", "PromptItem", "calibration_prompts",
           "choose_prompts", "embedded_prompts", "prompt_seeds", "read_prompt_file", "seeded_items"]

GENERIC_PROMPTS: tuple[str, ...] = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at sunset",
    "a bowl of fruit on a wooden table, studio lighting",
    "a red sports car in the snow",
)
#: What ``deepcache tune`` calibrates on for a model other than the embedded one (none of them is evaluated).
GENERIC_CALIBRATION_PROMPTS: tuple[str, ...] = (
    "a portrait of an old fisherman, oil painting",
    "a city street at night in the rain, neon signs",
    "a mountain lake surrounded by pine trees at dawn",
    "a cute robot reading a book in a library",
)


def embedded_prompts(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct captions drawn (seeded) from all 720 attribute combinations of the demo model.

    The draw is a seeded permutation, so a shorter list is a prefix of a longer one with the same seed.
    """
    from .demo_model.data import all_attributes, caption

    combos = all_attributes()
    if not 1 <= count <= len(combos):
        raise ValueError(f"count must be in 1..{len(combos)}, got {count}.")
    order = np.random.default_rng(seed).permutation(len(combos))[:count]
    return [caption(combos[i]) for i in order]


def choose_prompts(*, embedded: bool, count: int, seed: int = 0, given: Sequence[str] | None = None) -> list[str]:
    """``given`` when there are any; else :func:`embedded_prompts` (demo model) or the generic prompts."""
    if given:
        return list(given)
    if embedded:
        return embedded_prompts(count, seed=seed)
    return list(GENERIC_PROMPTS[:count])


def prompt_seeds(prompts: Sequence[str], first_seed: int = 0) -> list[int]:
    """One seed per prompt: ``first_seed + k`` for prompt ``k``."""
    return [first_seed + k for k in range(len(prompts))]


def calibration_prompts(*, embedded: bool, count: int, seed: int = 0, exclude: Sequence[str] = (),
                        given: Sequence[str] | None = None) -> list[str]:
    """Prompts to calibrate on, none of them in ``exclude`` (the evaluation prompts).

    ``given`` when there are any (``ValueError`` if one is also evaluated); else the first ``count`` captions of
    the seeded draw that are not excluded (demo model), or of :data:`GENERIC_CALIBRATION_PROMPTS`.
    """
    excluded = set(exclude)
    if given:
        shared = sorted(excluded.intersection(given))
        if shared:
            raise ValueError(f"calibration and evaluation prompts must differ; both have {shared[0]!r}.")
        return list(given)
    if embedded:
        pool = embedded_prompts(min(720, len(excluded) + count), seed=seed)
    else:
        pool = list(GENERIC_CALIBRATION_PROMPTS)
    chosen = [p for p in pool if p not in excluded][:count]
    if not chosen:
        raise ValueError("no calibration prompt is left that is not evaluated; pass --calibration-prompt.")
    return chosen


# -- prompt files ------------------------------------------------------------------------------------
#: Suffixes :func:`read_prompt_file` reads, and what each holds.
PROMPT_FILE_FORMATS: dict[str, str] = {
    ".txt": "one prompt a line (blank lines skipped)",
    ".jsonl": 'one JSON object a line: {"prompt": ..., "seed": ..., "negative_prompt": ...} (seed and '
              "negative_prompt optional)",
    ".csv": "a header row with a 'prompt' column (optional 'seed' and 'negative_prompt' columns)",
}
_ITEM_KEYS = ("prompt", "seed", "negative_prompt")


@dataclasses.dataclass(frozen=True)
class PromptItem:
    """One line of a prompts file: the prompt, its own seed (``None``: the run's ``first seed + index``) and its
    negative prompt (``None``: none, which diffusers encodes as the empty string)."""

    prompt: str
    seed: int | None = None
    negative_prompt: str | None = None


def read_prompt_file(path: str | Path) -> list[PromptItem]:
    """The items of a ``.txt``, ``.jsonl`` or ``.csv`` prompts file (see :data:`PROMPT_FILE_FORMATS`), in order.

    Raises ``ValueError`` naming the file and line of the first problem (bad JSON, a missing ``prompt``, an
    unknown key, a seed that is not an integer, an empty prompt), an unknown suffix or a file without prompts;
    ``FileNotFoundError`` when it does not exist.

    >>> import tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> with open(os.path.join(folder, "p.jsonl"), "w") as f:
    ...     _ = f.write('{"prompt": "a red circle", "seed": 7}\\n\\n{"prompt": "a blue square"}\\n')
    >>> read_prompt_file(os.path.join(folder, "p.jsonl"))
    [PromptItem(prompt='a red circle', seed=7, negative_prompt=None), PromptItem(prompt='a blue square', seed=None, negative_prompt=None)]
    >>> with open(os.path.join(folder, "bad.jsonl"), "w") as f:
    ...     _ = f.write('{"prompt": "a red circle"}\\n{"prompt": "a cat", "seed": 1.5}\\n')
    >>> read_prompt_file(os.path.join(folder, "bad.jsonl"))
    Traceback (most recent call last):
    ...
    ValueError: ...bad.jsonl line 2: "seed" must be an integer, got 1.5.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in PROMPT_FILE_FORMATS:
        kinds = "; ".join(f"{k}: {v}" for k, v in PROMPT_FILE_FORMATS.items())
        raise ValueError(f"{path}: unknown prompts file type {path.suffix!r}; use {kinds}.")
    if not path.is_file():
        raise FileNotFoundError(f"no prompts file at {path}.")
    text = path.read_text(encoding="utf-8-sig")
    rows = _csv_rows(path, text) if suffix == ".csv" else _line_rows(path, text, suffix == ".jsonl")
    items = [_item(path, line, row) for line, row in rows]
    if not items:
        raise ValueError(f"{path}: no prompts in the file; expected {PROMPT_FILE_FORMATS[suffix]}.")
    return items


def seeded_items(items: Sequence[PromptItem], first_seed: int = 0) -> list[PromptItem]:
    """Every item with a seed: its own, else ``first_seed + index``.

    >>> [i.seed for i in seeded_items([PromptItem("a"), PromptItem("b", seed=3), PromptItem("c")], 10)]
    [10, 3, 12]
    """
    return [item if item.seed is not None else dataclasses.replace(item, seed=first_seed + k)
            for k, item in enumerate(items)]


def _line_rows(path: Path, text: str, is_json: bool) -> list[tuple[int, dict[str, object]]]:
    rows: list[tuple[int, dict[str, object]]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if not is_json:
            rows.append((number, {"prompt": line.strip()}))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {number}: not valid JSON ({exc.msg}); expected "
                             f"{PROMPT_FILE_FORMATS['.jsonl']}.") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}.")
        rows.append((number, row))
    return rows


def _csv_rows(path: Path, text: str) -> list[tuple[int, dict[str, object]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))  # keeps newlines inside quoted cells
    if reader.fieldnames is None or "prompt" not in [f.strip() for f in reader.fieldnames]:
        raise ValueError(f"{path} line 1: no 'prompt' column (columns: {reader.fieldnames or []}); expected "
                         f"{PROMPT_FILE_FORMATS['.csv']}.")
    rows: list[tuple[int, dict[str, object]]] = []
    for row in reader:
        line = reader.line_num
        if None in row:
            raise ValueError(f"{path} line {line}: more fields than the header has columns.")
        values = {k.strip(): (v if v is None else v.strip()) for k, v in row.items()}
        if not any(values.values()):
            continue  # a blank line
        # empty optional cells mean "not given"
        rows.append((line, {k: v for k, v in values.items() if k == "prompt" or v not in ("", None)}))
    return rows


def _item(path: Path, line: int, row: dict[str, object]) -> PromptItem:
    where = f"{path} line {line}"
    unknown = sorted(set(row) - set(_ITEM_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {list(_ITEM_KEYS)}.")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f'{where}: "prompt" must be a non-empty string, got {prompt!r}.')
    seed = row.get("seed")
    if isinstance(seed, str):  # CSV cells are text
        try:
            seed = int(seed)
        except ValueError:
            pass
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f'{where}: "seed" must be an integer, got {seed!r}.')
    if seed is not None and not 0 <= seed < 2**63:
        raise ValueError(f'{where}: "seed" must be in 0..2**63-1, got {seed}.')
    negative = row.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise ValueError(f'{where}: "negative_prompt" must be a string, got {negative!r}.')
    return PromptItem(prompt, seed, negative)
