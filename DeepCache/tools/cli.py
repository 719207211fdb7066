"""The `deepcache` command line.

Each subcommand lives in its own module, which defines ``add_parser(subparsers)``; the
module registers its parser and sets ``func`` (called with the parsed namespace, returning an
exit code). ``deepcache --help`` lists exactly the modules named in ``_COMMAND_MODULES``.

Example::

    $ deepcache --version
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from .. import __version__

# One entry per subcommand module; each exposes ``add_parser(subparsers)``.
_COMMAND_MODULES: tuple[str, ...] = ("DeepCache.tools.bench", "DeepCache.tools.demo", "DeepCache.tools.evaluate", "DeepCache.tools.generate",
                                     "DeepCache.tools.tune",
                                     "DeepCache.tools.demo_model.train", "DeepCache.tools.demo_model.train_dit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepcache",
        description="DeepCache: training-free acceleration of diffusers U-Net and transformer pipelines by caching deep features.",
    )
    parser.add_argument("--version", action="version", version=f"DeepCache {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
