"""The README and the command line say what the code does."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import DeepCache
from DeepCache.engine import unet_layout
from DeepCache.tools.cli import main
from DeepCache.engine.unet.layout import branch_table_markdown
from DeepCache.tools.metrics import psnr

from .tiny import tiny_sd_unet, tiny_sdxl_unet

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("name, make", [("sd", tiny_sd_unet), ("sdxl", tiny_sdxl_unet)])
def test_readme_branch_tables_are_generated(name: str, make) -> None:
    text = README.read_text()
    match = re.search(rf"<!-- branch-table:{name}:start -->\n(.*?)\n<!-- branch-table:{name}:end -->", text, re.S)
    assert match, f"README lacks the {name} branch table markers"
    assert match.group(1) == branch_table_markdown(unet_layout(make()))


def test_readme_snippet_is_the_public_contract() -> None:
    text = README.read_text()
    assert "from DeepCache import DeepCacheSDHelper\nhelper = DeepCacheSDHelper(pipe=pipe)\n" in text
    assert "helper.set_params(cache_interval=3, cache_branch_id=0)\nhelper.enable()\n" in text


def test_version_flag(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"DeepCache {DeepCache.__version__}"


SUBCOMMANDS = ["bench", "demo", "eval", "generate", "tune", "train-demo-model", "train-demo-dit"]


def test_console_script_help_lists_exactly_the_subcommands() -> None:
    out = subprocess.run([sys.executable, "-m", "DeepCache", "--help"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("usage: deepcache ")
    assert re.findall(r"^    (\S+)", out, re.M) == SUBCOMMANDS  # one entry per line under COMMAND, in order


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help_and_the_readme_names_it(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: deepcache {command} ")
    assert f"`deepcache {command}`" in README.read_text()


def test_readme_code_map_names_every_module() -> None:
    text = README.read_text()
    section = text[text.index("## Code map"):]
    section = section[: section.index("\n## ", 1)]
    package = Path(DeepCache.__file__).parent
    modules = sorted(str(p.relative_to(package.parent)) for p in package.rglob("*.py"))
    listed = re.findall(r"^- `(DeepCache/[\w/]+\.py)`", section, re.M)
    assert sorted(listed) == modules


def test_readme_serving_example_runs_and_caches_each_request() -> None:
    text = README.read_text()
    match = re.search(r"<!-- serving-example:start -->\n```python\n(.*?)```\n<!-- serving-example:end -->", text, re.S)
    assert match, "README lacks the serving example"
    namespace: dict = {}
    exec(compile(match.group(1), "README serving example", "exec"), namespace)  # noqa: S102 - our own README
    images = namespace["images"]
    assert len(images) == 4 and all(image.size == images[0].size for image in images)
    handle, prompts = namespace["handle"], namespace["prompts"]
    # the same requests one by one give the same images
    assert [handle(p, s, i).tobytes() for p, s, i in zip(prompts, range(4), [3, 3, 4, 5])] == [image.tobytes() for image in images]
    # and DeepCache did something: every image differs from the uncached one (interval 1); at interval 3 it stays
    # close to it (measured 45.7 and 51.3 dB; intervals 4 and 5 may change this small model's shapes: 7.8, 25.2 dB)
    for prompt, seed, interval, image in zip(prompts, range(4), [3, 3, 4, 5], images):
        cached, uncached = (np.asarray(x, dtype=np.float64)[None] / 255 for x in (image, handle(prompt, seed, 1)))
        assert not np.array_equal(cached, uncached), prompt
        if interval == 3:
            assert psnr(cached, uncached)[0] > 35.0, prompt


def _package_modules() -> list[str]:
    import pkgutil

    found = (m.name for m in pkgutil.walk_packages(DeepCache.__path__, "DeepCache.") if m.name != "DeepCache.__main__")
    return ["DeepCache", *sorted(found)]


@pytest.mark.parametrize("name", _package_modules())
def test_docstring_examples_run(name: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} fail (pytest --doctest-modules)"
