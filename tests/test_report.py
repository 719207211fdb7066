"""The shared tools layer: the table renderer, the JSON writer, the shared CLI options and quiet output."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import warnings
from pathlib import Path

import pytest

from DeepCache.tools import cli_common, pipelines
from DeepCache.tools.report import Column, format_value, json_document, json_line, render_table, to_jsonable, write_json

COLUMNS = [Column("name", "name"), Column("x", "x", ".2f", align="right"), Column("y", "y", ".1f", " %"),
           Column("z", "z", lambda v: f"<{v}>")]
ROWS = [{"name": "a", "x": 1.0, "y": None, "z": 3}, {"name": "bb", "x": float("nan"), "y": None}]


def test_markdown_table_exact() -> None:
    assert render_table(COLUMNS, ROWS) == (
        "| name | x | y | z |\n"
        "|---|---:|---|---|\n"
        "| a | 1.00 | n/a | <3> |\n"
        "| bb | n/a | n/a | n/a |"
    )


def test_plain_table_exact_and_empty_columns_dropped() -> None:
    assert render_table(COLUMNS, ROWS, style="plain", drop_empty=True) == (
        "name     x  z\n"
        "----  ----  ---\n"
        "a     1.00  <3>\n"
        "bb     n/a  n/a"
    )
    # the first column stays even when empty
    assert render_table([Column("y", "y")], [{}], drop_empty=True) == "| y |\n|---|\n| n/a |"
    with pytest.raises(ValueError, match="unknown table style 'html'"):
        render_table(COLUMNS, ROWS, style="html")


def test_format_value() -> None:
    assert format_value(float("inf"), ".2f") == "inf"
    assert format_value(float("nan"), ".2f") == "n/a" and format_value(None) == "n/a"
    assert format_value(3, "d", " GiB") == "3 GiB"


@dataclasses.dataclass
class _Row:
    a: float
    b: tuple


def test_json_is_strict_and_the_document_layout_is_shared(tmp_path: Path) -> None:
    doc = json_document("deepcache test", rows=[_Row(float("nan"), (1, Path("p")))], meta={"psnr": float("inf")})
    assert to_jsonable(doc) == {"schema_version": 1, "tool": "deepcache test", "rows": [{"a": None, "b": [1, "p"]}],
                                "meta": {"psnr": None}}
    path = write_json(tmp_path / "sub" / "r.json", doc)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text and json.loads(text) == to_jsonable(doc)
    assert json_line({"x": math.inf, "y": (1, 2)}) == '{"x": null, "y": [1, 2]}'


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    cli_common.add_variant_option(parser, default_help="3,0")
    cli_common.add_device_options(parser, default_device="cpu")
    cli_common.add_threads_option(parser)
    cli_common.add_prompt_options(parser, default_count=6)
    cli_common.add_json_option(parser, "--out")
    cli_common.add_table_options(parser)
    return parser


def test_shared_options_parse_the_same_everywhere() -> None:
    args = _parser().parse_args(["--variant", "3,0", "--variant", "original", "--threads", "2", "--prompt", "a cat",
                                 "--out", "r.json", "--table", "plain"])
    assert [s.label for s in args.variant] == ["I=3, B=0", "original"]
    assert (args.device, args.dtype, args.threads, args.prompt, args.num_prompts) == ("cpu", "auto", 2, ["a cat"], 6)
    assert (args.json, args.table, args.verbose) == (Path("r.json"), "plain", False)


@pytest.mark.parametrize("argv, message", [
    (["--variant", "3;0"], "argument --variant: malformed setting '3;0'"),
    (["--threads", "0"], "argument --threads: expected an integer >= 1, got 0"),
    (["--num-prompts", "x"], "argument --num-prompts: expected an integer >= 1, got 'x'"),
    (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
])
def test_shared_options_reject_bad_values_clearly(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_device_and_dtype_resolution() -> None:
    import torch

    assert pipelines.resolve_device("cpu") == torch.device("cpu")
    assert pipelines.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert pipelines.resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert pipelines.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="unsupported device 'tpu'"):
        pipelines.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            pipelines.resolve_device("cuda")


def test_run_command_turns_value_errors_into_status_2(capsys) -> None:
    def fails(args: argparse.Namespace) -> int:
        raise ValueError("bad value")

    assert cli_common.run_command("x", fails, argparse.Namespace()) == 2
    assert capsys.readouterr().err == "deepcache x: error: bad value\n"
    assert cli_common.run_command("x", lambda args: 0, argparse.Namespace()) == 0


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_quiet_third_party_holds_back_library_warnings_but_not_errors() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    tf_logger = transformers_logging.get_logger("transformers.image_processing_utils")
    records = _Records()
    tf_logger.addHandler(records)
    before = (transformers_logging.get_verbosity(), diffusers_logging.get_verbosity(),
              transformers_logging.is_progress_bar_enabled(), diffusers_logging.is_progress_bar_enabled())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with cli_common.quiet_third_party():
            tf_logger.warning("torchvision fallback")
            tf_logger.error("a real error")
            assert not transformers_logging.is_progress_bar_enabled()
            assert not diffusers_logging.is_progress_bar_enabled()
            warnings.warn_explicit("deprecated thing", FutureWarning, "x.py", 1, module="diffusers.pipelines.x")
            warnings.warn_explicit("ours", UserWarning, "y.py", 1, module="DeepCache.tools.bench")
    tf_logger.removeHandler(records)
    assert records.messages == ["a real error"]
    assert [str(w.message) for w in caught] == ["ours"]
    after = (transformers_logging.get_verbosity(), diffusers_logging.get_verbosity(),
             transformers_logging.is_progress_bar_enabled(), diffusers_logging.is_progress_bar_enabled())
    assert after == before
    assert transformers_logging.get_verbosity() <= logging.WARNING  # restored: warnings show again
