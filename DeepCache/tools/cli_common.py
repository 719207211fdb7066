"""What every ``deepcache`` subcommand shares: its options, their parsing, errors, quiet output and progress.

A subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int`` and registers both with
:func:`register`; the same two serve ``python -m DeepCache.<module>`` through :func:`standalone`.
The options every tool spells the same way are added here: ``--model``, ``--device``/``--dtype``,
``--threads``, ``--variant``, ``--prompt``/``--num-prompts``, ``--seed``/``--steps``/``--guidance``/``--repeats``,
``--out``, ``--json``, ``--table`` and ``--verbose``; :func:`kind_from_args` loads the pipeline they name as its kind
(decided once, here) and picks the prompts. A ``ValueError`` raised by ``run`` is printed as
``deepcache NAME: error: ...`` with exit status 2, like argparse's own errors.

Example::

    >>> import argparse
    >>> from DeepCache.tools.cli_common import add_variant_option
    >>> parser = argparse.ArgumentParser()
    >>> add_variant_option(parser, default_help="3,0")
    >>> [s.label for s in parser.parse_args(["--variant", "3,0", "--variant", "5,1,non-uniform"]).variant]
    ['I=3, B=0', 'I=5, B=1, non-uniform']
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .kinds import PipelineKind, load_kind
from .pipelines import DTYPES, is_demo_pipeline, load_pipeline, resolve_device, resolve_dtype  # noqa: F401
from .prompts import choose_prompts
from .report import TABLE_STYLES
from .runs import DEFAULT_GUIDANCE, DEFAULT_STEPS
from .settings import Setting

__all__ = [
    "Progress",
    "add_device_options",
    "add_generation_arguments",
    "add_json_option",
    "add_model_option",
    "add_out_option",
    "add_prompt_options",
    "add_table_options",
    "add_threads_option",
    "add_variant_option",
    "apply_threads",
    "kind_from_args",
    "pipeline_from_args",
    "positive_int",
    "quiet_third_party",
    "register",
    "run_command",
    "standalone",
]

#: Libraries whose warnings and loading bars :func:`quiet_third_party` holds back.
THIRD_PARTY = ("diffusers", "transformers", "torchvision", "huggingface_hub", "accelerate")

Run = Callable[[argparse.Namespace], int]
AddArguments = Callable[[argparse.ArgumentParser], None]


# -- argument types ---------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _setting(text: str) -> Setting:
    try:
        return Setting.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# -- shared options ---------------------------------------------------------------------------------
def add_model_option(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--model", metavar="MODEL", help=help)


def add_device_options(parser: argparse.ArgumentParser, *, default_device: str | None = "auto") -> None:
    """``--device`` (auto, cpu, cuda, cuda:N) and ``--dtype`` (auto: float16 on CUDA, float32 on CPU)."""
    parser.add_argument("--device", default=default_device,
                        help=f"auto (CUDA when available), cpu, cuda or cuda:N (default {default_device})")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="auto (default): float16 on CUDA, float32 on CPU")


def add_threads_option(parser: argparse.ArgumentParser, *, default_help: str = "torch's own") -> None:
    parser.add_argument("--threads", type=positive_int,
                        help=f"torch CPU threads (default: {default_help}; 1 is fastest on a busy shared CPU)")


def add_variant_option(parser: argparse.ArgumentParser, *, default_help: str, repeatable: bool = True) -> None:
    """``--variant I,B[,SCHEDULE[,KEY=VALUE...]]`` parsed into :class:`Setting` objects: a list when ``repeatable``,
    else one setting."""
    parser.add_argument(
        "--variant", action="append" if repeatable else "store", type=_setting, metavar="I,B[,SCHEDULE]",
        help="DeepCache setting: interval, branch, optional schedule uniform | non-uniform (the paper's center 15, "
        "or the last step if fewer steps) | custom (with full_steps=0/4/8), then any other set_params field as "
        f"KEY=VALUE (e.g. 3,0,start_step=2); 'original' is the uncached pipeline{'; repeatable' if repeatable else ''} "
        f"(default {default_help})",
    )


def add_prompt_options(parser: argparse.ArgumentParser, *, default_count: int) -> None:
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable); default: see --num-prompts")
    parser.add_argument("--num-prompts", type=positive_int, default=default_count,
                        help="how many default prompts: seeded captions for the embedded model, generic prompts "
                        f"otherwise (default {default_count})")


def add_generation_arguments(parser: argparse.ArgumentParser, *, default_repeats: int | None = 1,
                             repeats_default_help: str | None = None) -> None:
    """``--seed``, ``--steps``, ``--guidance``, ``--repeats``: how every setting generates (``eval``, ``demo``, ``tune``)."""
    parser.add_argument("--seed", type=int, default=0, help="first seed; image k uses seed+k (default 0)")
    parser.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS,
                        help=f"denoising steps (default {DEFAULT_STEPS})")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                        help=f"guidance scale (default {DEFAULT_GUIDANCE})")
    parser.add_argument("--repeats", type=positive_int, default=default_repeats,
                        help="timed repeats per setting, the order rotated between them; the median is reported "
                        f"(default {repeats_default_help or default_repeats})")


def add_out_option(parser: argparse.ArgumentParser, *, help: str, default: str | None = None,
                   required: bool = False) -> None:
    parser.add_argument("--out", type=Path, default=None if default is None else Path(default), required=required,
                        metavar="PATH", help=help)


def add_json_option(parser: argparse.ArgumentParser, *flags: str) -> None:
    """``--json PATH`` (plus any alias ``flags``): where the JSON report goes."""
    parser.add_argument("--json", *flags, dest="json", type=Path, metavar="PATH", help="write the JSON report here")


def add_table_options(parser: argparse.ArgumentParser) -> None:
    """``--table markdown|plain`` and ``--verbose`` (show third-party warnings and loading bars)."""
    parser.add_argument("--table", choices=TABLE_STYLES, default="markdown", help="table style (default markdown)")
    parser.add_argument("--verbose", action="store_true",
                        help="also show the warnings and loading bars of diffusers and transformers")


# -- resolving them ---------------------------------------------------------------------------------
def kind_from_args(args: argparse.Namespace, device: torch.device | None = None) -> tuple[PipelineKind, list[str]]:
    """The pipeline, loaded as its kind once here (``--model``, ``--device`` unless ``device`` is given, ``--dtype``;
    :func:`~DeepCache.tools.kinds.load_kind`), and its prompts (``--prompt``, ``--num-prompts``, ``--seed``)."""
    device = device or resolve_device(args.device)
    kind = load_kind(args.model, device, resolve_dtype(args.dtype, device))
    prompts = choose_prompts(embedded=kind.embedded, count=args.num_prompts, seed=args.seed, given=args.prompt)
    return kind, prompts


def pipeline_from_args(args: argparse.Namespace, device: torch.device | None = None) -> tuple[Any, list[str]]:
    """:func:`kind_from_args` with the bare pipeline (for ``deepcache tune``, which holds one)."""
    kind, prompts = kind_from_args(args, device)
    return kind.pipe, prompts


def apply_threads(threads: int | None) -> None:
    """Set torch's CPU threads (``None``: leave torch's default)."""
    if threads is not None:
        torch.set_num_threads(threads)


# -- subcommands ------------------------------------------------------------------------------------
def _description(module_doc: str | None) -> str | None:
    return module_doc.split("\n\n")[0].replace("``", "") if module_doc else None


def register(subparsers: Any, name: str, *, help: str, module_doc: str | None, add_arguments: AddArguments,
             run: Run, epilog: str | None = None, **defaults: Any) -> argparse.ArgumentParser:
    """Add subcommand ``name`` (its description is the first paragraph of ``module_doc``; ``epilog`` ends its help)."""
    parser = subparsers.add_parser(name, help=help, description=_description(module_doc), epilog=epilog)
    add_arguments(parser)
    parser.set_defaults(func=lambda args: run_command(name, run, args), **defaults)
    return parser


def standalone(prog: str, module_doc: str | None, add_arguments: AddArguments, run: Run,
               argv: Sequence[str] | None = None, name: str | None = None) -> int:
    """``python -m DeepCache.<module> ...``: the same parser and errors as ``deepcache <name> ...``."""
    parser = argparse.ArgumentParser(prog=prog, description=_description(module_doc))
    add_arguments(parser)
    return run_command(name or prog, run, parser.parse_args(argv))


def run_command(name: str, run: Run, args: argparse.Namespace) -> int:
    """``run(args)``; a ``ValueError`` or missing file becomes ``deepcache NAME: error: ...`` and status 2."""
    try:
        return int(run(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"deepcache {name}: error: {exc}", file=sys.stderr)
        return 2


# -- output -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_third_party(enabled: bool = True) -> Iterator[None]:
    """Inside the block, hold back the warnings and loading bars of diffusers, transformers and friends.

    Their log level is raised to ERROR (errors still print) and their Python warnings (``UserWarning``,
    ``FutureWarning``, ``DeprecationWarning``) are ignored; exceptions pass through untouched. Everything is
    restored afterwards.
    """
    if not enabled:
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled())
             for lib in (diffusers_logging, transformers_logging)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            pattern = rf"({'|'.join(THIRD_PARTY)})(\..*)?$"
            for category in (UserWarning, FutureWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category, module=pattern)
            yield
    finally:
        for lib, level, bar in saved:
            lib.set_verbosity(level)
            (lib.enable_progress_bar if bar else lib.disable_progress_bar)()


class Progress:
    """A tqdm bar on stderr when wanted (and tqdm is installed), else nothing."""

    def __init__(self, total: int, enabled: bool, desc: str, unit: str = "call") -> None:
        self.bar: Any = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # progress is cosmetic
                return
            self.bar = tqdm(total=total, file=sys.stderr, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, text: str = "", n: int = 1) -> None:
        """``n`` more done; ``text`` shown after the bar."""
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(n)

    def stage(self, text: str) -> None:
        """Say what runs now (after the bar), without counting anything done."""
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)

    def update_to(self, done: int, text: str = "") -> None:
        """``done`` in all (a count read from elsewhere, e.g. what every process finished)."""
        if self.bar is not None and done > self.bar.n:
            self.update(text, done - self.bar.n)

    def set_total(self, total: int) -> None:
        """Correct the expected count once it is known."""
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
