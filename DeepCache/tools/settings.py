"""One DeepCache setting for every tool: a :class:`~DeepCache.schedules.params.CacheParams` with a parser and a label.

``deepcache bench``, ``eval``, ``demo`` and ``generate`` take ``--variant I,B[,SCHEDULE[,KEY=VALUE...]]``, and
every tool, ``tune`` too, prints the same label for a setting. :class:`Setting` *is* a
``CacheParams`` (a subclass with no fields of its own), so every schedule kind and parameter the core
adds is parsed, labelled, validated and handed to the helper here, once, with no tool changes.

A uniform interval of 1 never caches: ``Setting()`` is the original (uncached) pipeline, labelled
``original``; tools run it without a helper.

Example::

    >>> from DeepCache.tools.settings import Setting
    >>> Setting.parse("3,0").label, Setting.parse("5,1,non-uniform").label
    ('I=3, B=0', 'I=5, B=1, non-uniform')
    >>> Setting.parse("1,0,custom,full_steps=0/4/8").label
    'I=1, B=0, custom, full_steps=0/4/8'
    >>> Setting.parse("I=5, B=1, non-uniform") == Setting(5, 1, "non-uniform")  # a label parses back
    True
    >>> Setting().label, Setting.parse("original").is_baseline
    ('original', True)

A forecast (``set_params(forecast="linear", ...)``) is two more fields; per-step weights are written with ``/``,
a run of equal weights as ``COUNTxWEIGHT`` (``3x0`` is three zeros), and parse back::

    >>> Setting.parse("3,0,forecast=linear").label
    'I=3, B=0, forecast=linear'
    >>> s = Setting.parse("1,0,custom,full_steps=0/2/4,forecast=linear,forecast_weight=0,forecast_weights=0/0/0/0.5/0")
    >>> s.forecast_weights, s.label
    ((0.0, 0.0, 0.0, 0.5, 0.0), 'I=1, B=0, custom, full_steps=0/2/4, forecast=linear, forecast_weight=0, forecast_weights=3x0/0.5/0')
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterable, Iterator, Sequence

from ..schedules.params import CacheParams

__all__ = ["BASELINE", "BASELINE_LABEL", "Setting", "applied", "baseline_first", "setting_grid"]

#: Label of the uncached pipeline in every table and JSON file.
BASELINE_LABEL = "original"
#: Words that parse to the uncached pipeline.
BASELINE_NAMES: tuple[str, ...] = (BASELINE_LABEL, "baseline", "uncached", "none")
#: Fields the first three comma-separated parts give; every other field is ``KEY=VALUE``.
_POSITIONAL = ("cache_interval", "cache_branch_id", "skip_mode")
_SYNTAX = "expected INTERVAL,BRANCH[,SCHEDULE[,KEY=VALUE...]], e.g. 3,0 or 5,1,non-uniform or 1,0,custom,full_steps=0/4/8"


@dataclasses.dataclass(frozen=True)
class Setting(CacheParams):
    """A :class:`CacheParams` as the tools see it: parsed from ``--variant``, labelled in tables.

    Built exactly like ``CacheParams`` (``Setting(3, 0)``, ``Setting(5, 1, "non-uniform", center=10)``)
    and validated by it.
    """

    @property
    def is_baseline(self) -> bool:
        """A uniform interval of 1: every step is full, so the tools run the pipeline without a helper."""
        return self.skip_mode == "uniform" and self.cache_interval == 1

    @property
    def label(self) -> str:
        """``I=3, B=0``; then the schedule when not uniform, then every other field that differs from its default.

        >>> Setting(5, 1, "non-uniform", center=10).label
        'I=5, B=1, non-uniform, center=10'
        """
        if self.is_baseline:
            return BASELINE_LABEL
        parts = [f"I={self.cache_interval}", f"B={self.cache_branch_id}"]
        if self.skip_mode != "uniform":
            parts.append(self.skip_mode)
        parts += [f"{name}={_format_value(value)}" for name, value in self.extra_fields().items()]
        return ", ".join(parts)

    def extra_fields(self) -> dict[str, Any]:
        """The fields beyond interval, branch and schedule whose value differs from the default."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(CacheParams)
            if f.name not in _POSITIONAL and getattr(self, f.name) != f.default
        }

    @classmethod
    def parse(cls, text: str) -> Setting:
        """Parse ``I,B[,SCHEDULE[,KEY=VALUE...]]`` (a :attr:`label` too), or ``original``/``baseline``.

        ``KEY`` is any other ``CacheParams`` field; lists are written with ``/`` (``full_steps=0/4/8``), a run of
        equal values as ``COUNTxVALUE`` (``forecast_weights=2x0/0.5``: 0, 0, 0.5).
        Raises ``ValueError`` that names the problem and the expected form.

        >>> Setting.parse("3,0,start_step=2").label
        'I=3, B=0, start_step=2'
        """
        stripped = str(text).strip()
        if stripped.lower() in BASELINE_NAMES:
            return cls()
        parts = [_strip_prefix(p.strip()) for p in stripped.split(",")]
        count = 0  # leading parts without "=": interval, branch and the optional schedule
        while count < min(3, len(parts)) and "=" not in parts[count]:
            count += 1
        if count < 2 or not all(parts):
            raise ValueError(f"malformed setting {text!r}: {_SYNTAX}.")
        try:
            values: dict[str, Any] = {"cache_interval": int(parts[0]), "cache_branch_id": int(parts[1])}
        except ValueError:
            raise ValueError(f"malformed setting {text!r}: INTERVAL and BRANCH must be integers, e.g. 3,0.") from None
        if count == 3:
            values["skip_mode"] = parts[2]
        values.update(_parse_extras(text, parts[count:]))
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"setting {text!r}: {exc}") from None

    @classmethod
    def of(cls, params: CacheParams | str) -> Setting:
        """A ``Setting`` from a ``CacheParams`` (the same fields) or from a string (:meth:`parse`).

        >>> Setting.of(CacheParams(cache_interval=3)) == Setting(3, 0)
        True
        """
        if isinstance(params, cls):
            return params
        if isinstance(params, str):
            return cls.parse(params)
        if isinstance(params, CacheParams):
            return cls(**_fields(params))
        raise TypeError(f"expected a CacheParams, Setting or 'I,B[,SCHEDULE]' string, got {type(params).__name__}.")

    def for_steps(self, num_steps: int) -> Setting:
        """This setting for a ``num_steps``-evaluation generation: a non-uniform ``center`` beyond the
        last step moves to the last step (the paper's center 15 assumes 50 steps).

        >>> Setting(3, 0, "non-uniform").for_steps(10).center
        9
        """
        if self.skip_mode == "non-uniform" and self.center >= num_steps >= 1:
            return dataclasses.replace(self, center=num_steps - 1)
        return self

    def set_params_call(self, helper: str = "helper") -> str:
        """The Python line that sets this setting: interval and branch, then the schedule and other fields if set.

        >>> Setting(12, 0, "adaptive", threshold=0.05).set_params_call()
        'helper.set_params(cache_interval=12, cache_branch_id=0, skip_mode="adaptive", threshold=0.05)'
        >>> Setting(1, 2, "custom", full_steps=(0, 3, 9)).set_params_call()
        'helper.set_params(cache_interval=1, cache_branch_id=2, skip_mode="custom", full_steps=[0, 3, 9])'
        """
        values = {"cache_interval": self.cache_interval, "cache_branch_id": self.cache_branch_id}
        if self.skip_mode != "uniform":
            values["skip_mode"] = self.skip_mode
        values.update(self.extra_fields())
        args = ", ".join(f"{name}={_python_value(value)}" for name, value in values.items())
        return f"{helper}.set_params({args})"

    def helper_kwargs(self) -> dict[str, Any]:
        """Every field as a keyword of :meth:`DeepCacheSDHelper.set_params` (whose keywords are the fields)."""
        return _fields(self)

    def to_dict(self) -> dict[str, Any]:
        """Every field and the label, for JSON reports."""
        return {**self.helper_kwargs(), "label": self.label}


#: The original, uncached pipeline.
BASELINE = Setting()


def baseline_first(settings: Iterable[Setting]) -> list[Setting]:
    """The original first, then each distinct caching setting once, in the order given (a setting that never caches
    is the original): the order every tool runs and reports settings in.

    >>> [s.label for s in baseline_first([Setting(3, 0), BASELINE, Setting(3, 0), Setting(5, 1)])]
    ['original', 'I=3, B=0', 'I=5, B=1']
    """
    return [BASELINE, *(s for s in dict.fromkeys(settings) if not s.is_baseline)]


def _fields(params: CacheParams) -> dict[str, Any]:
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(CacheParams)}


def _strip_prefix(part: str) -> str:
    """``"I=3"`` -> ``"3"``, ``"B=0"`` -> ``"0"`` (so a label parses back); anything else unchanged."""
    head, sep, tail = part.partition("=")
    return tail.strip() if sep and head.strip().upper() in ("I", "B") else part


def _parse_extras(text: str, items: Sequence[str]) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(CacheParams) if f.name not in _POSITIONAL}
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = (s.strip() for s in item.partition("="))
        if not sep or key not in fields:
            raise ValueError(
                f"malformed setting {text!r}: {item!r} is not KEY=VALUE with KEY one of {', '.join(fields)}."
            )
        values[key] = _parse_value(raw, is_sequence="tuple" in str(fields[key].type))
    return values


def _parse_value(raw: str, is_sequence: bool = False) -> Any:
    """``none`` -> None; a sequence field ``0/4/8`` -> (0, 4, 8) (``3x0.5`` is three times 0.5, see
    :func:`_parse_sequence`); ``10`` -> 10; ``1.5`` -> 1.5; else the string."""
    if raw.lower() == "none":
        return None
    if is_sequence:
        try:
            return _parse_sequence(raw)
        except ValueError:
            return raw
    return _parse_number(raw)


def _parse_number(raw: str) -> Any:
    """``10`` -> 10, ``1.5`` -> 1.5, anything else unchanged."""
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def _parse_sequence(raw: str) -> tuple[Any, ...]:
    """``0/4/8`` -> (0, 4, 8); ``COUNTxVALUE`` repeats a value: ``2x0/0.5/3x0.25`` -> (0, 0, 0.5, 0.25, 0.25, 0.25).

    Raises ``ValueError`` when an item is not a number.
    """
    values: list[Any] = []
    for item in (x.strip() for x in raw.split("/")):
        if not item:
            continue
        count, sep, value = item.partition("x")
        number = _parse_number(value if sep else item)
        if isinstance(number, str) or (sep and (not count.isdigit() or int(count) < 1)):
            raise ValueError(f"not a number: {item!r}")
        values += [number] * (int(count) if sep else 1)
    return tuple(values)


def _number(value: Any) -> str:
    """A number as short as it can be and still parse back exactly: ``0.0`` -> ``0``, ``0.25`` -> ``0.25``."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def _format_sequence(values: Sequence[Any]) -> str:
    """``/``-separated, runs of two or more equal numbers as ``COUNTxVALUE``: (0.0, 0.0, 0.5) -> ``2x0/0.5``
    (integer sequences, such as full steps, are written out).

    >>> _format_sequence((0.0, 0.0, 0.0, 0.5, 0.25, 0.25)), _format_sequence((0, 4, 8))
    ('3x0/0.5/2x0.25', '0/4/8')
    """
    if not any(isinstance(v, float) for v in values):
        return "/".join(str(v) for v in values)
    runs: list[tuple[int, Any]] = []
    for value in values:
        if runs and runs[-1][1] == value:
            runs[-1] = (runs[-1][0] + 1, value)
        else:
            runs.append((1, value))
    return "/".join(_number(v) if n == 1 else f"{n}x{_number(v)}" for n, v in runs)


def _format_value(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return _format_sequence(value)
    return _number(value)


def _python_value(value: Any) -> str:
    """A value as Python source: strings in double quotes, tuples as lists, whole floats without ``.0``."""
    if isinstance(value, str):
        return '"' + value + '"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_python_value(v) for v in value) + "]"
    return _number(value) if isinstance(value, float) else repr(value)


@contextlib.contextmanager
def applied(helper: Any, setting: Setting, num_steps: int) -> Iterator[None]:
    """Run the block with ``setting`` enabled on ``helper`` (nothing for the baseline); disabled afterwards.

    ``num_steps`` is the generation's length (see :meth:`Setting.for_steps`).
    """
    if setting.is_baseline:
        yield
        return
    helper.set_params(**setting.for_steps(num_steps).helper_kwargs())
    helper.enable()
    try:
        yield
    finally:
        helper.disable()


def setting_grid(intervals: Sequence[int] = (2, 3, 4, 5), branches: Sequence[int] = (0, 1, 2)) -> list[Setting]:
    """Every uniform (interval, branch) pair, interval-major.

    >>> [s.label for s in setting_grid((2, 3), (0,))]
    ['I=2, B=0', 'I=3, B=0']
    """
    return [Setting(i, b) for i in intervals for b in branches]
