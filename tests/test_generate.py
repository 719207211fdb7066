"""`deepcache generate`: prompt files, the resumable image store, and the same bytes on one or two processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from DeepCache.tools.cli import main
from DeepCache.tools.distributed import process_info, shard
from DeepCache.tools.generate import STOP_AFTER_VARIABLE, check_finished, pending_batches, setting_from_args
from DeepCache.tools.image_store import ImageStore, read_records
from DeepCache.tools.prompts import PromptItem, embedded_prompts, read_prompt_file, seeded_items
from DeepCache.schedules.schedule import CacheParams
from DeepCache.tools.settings import Setting

ROOT = Path(__file__).resolve().parents[1]
NUM_ITEMS = 5
# Small and fast: 5 items, 3 steps, batches of 2 (so batches are shared out unevenly and the last one is short).
ARGS = ["--steps", "3", "--batch-size", "2", "--threads", "1", "--no-progress", "--variant", "3,0"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- prompt files ----------------------------------------------------------------------------------------
def test_txt_file_skips_blank_lines(tmp_path: Path) -> None:
    items = read_prompt_file(_write(tmp_path / "p.txt", "a red circle\n\n  \n a blue square \n"))
    assert items == [PromptItem("a red circle"), PromptItem("a blue square")]


def test_jsonl_file_with_seeds_and_negative_prompts(tmp_path: Path) -> None:
    text = '{"prompt": "a", "seed": 7, "negative_prompt": "blurry"}\n\n{"prompt": "b"}\n'
    assert read_prompt_file(_write(tmp_path / "p.jsonl", text)) == [PromptItem("a", 7, "blurry"), PromptItem("b")]


def test_csv_cells_keep_their_newlines_and_excel_files_are_read(tmp_path: Path) -> None:
    text = 'prompt,seed\r\n"a cat\non two lines",3\r\nb,4\r\n'
    path = tmp_path / "p.csv"
    path.write_bytes(text.encode("utf-8-sig"))  # Excel: a byte-order mark and CRLF line ends
    assert read_prompt_file(path) == [PromptItem("a cat\non two lines", 3), PromptItem("b", 4)]


def test_csv_file_with_optional_columns(tmp_path: Path) -> None:
    text = "prompt,seed,negative_prompt\n\"a, b\",3,\nc,,ugly\n"
    assert read_prompt_file(_write(tmp_path / "p.csv", text)) == [PromptItem("a, b", 3), PromptItem("c", None, "ugly")]


def test_item_seeds_default_to_first_seed_plus_index() -> None:
    assert [i.seed for i in seeded_items([PromptItem("a"), PromptItem("b", 100), PromptItem("c")], 5)] == [5, 100, 7]


@pytest.mark.parametrize("name, text, message", [
    ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b"\n', "p.jsonl line 2: not valid JSON"),
    ("p.jsonl", '{"prompt": "a"}\n\n{"prompt": "b", "steps": 3}\n', "p.jsonl line 3: unknown key(s) ['steps']"),
    ("p.jsonl", '{"seed": 1}\n', 'p.jsonl line 1: "prompt" must be a non-empty string'),
    ("p.jsonl", '{"prompt": "a", "seed": "x"}\n', 'p.jsonl line 1: "seed" must be an integer'),
    ("p.jsonl", '["a"]\n', "p.jsonl line 1: expected a JSON object, got list"),
    ("p.csv", "caption,seed\na,1\n", "p.csv line 1: no 'prompt' column"),
    ("p.csv", "prompt,seed\na,1\nb,2.5\n", 'p.csv line 3: "seed" must be an integer'),
    ("p.txt", "\n\n", "p.txt: no prompts in the file"),
    ("p.jsonl", "", "p.jsonl: no prompts in the file"),
    ("p.yaml", "- a\n", "unknown prompts file type '.yaml'"),
])
def test_malformed_prompt_files_are_clear_errors(tmp_path: Path, name: str, text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        read_prompt_file(_write(tmp_path / name, text))
    assert message in str(info.value)


@pytest.mark.parametrize("name, text, message", [
    ("p.jsonl", '{"prompt": "a"}\n{"prompt": \n', "p.jsonl line 2: not valid JSON"),
    ("p.csv", "caption\na\n", "no 'prompt' column"),
    ("p.txt", "", "no prompts in the file"),
])
def test_generate_with_a_malformed_file_makes_nothing(tmp_path: Path, capsys, name: str, text: str,
                                                      message: str) -> None:
    out = tmp_path / "out"
    assert main(["generate", "--prompts", str(_write(tmp_path / name, text)), "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deepcache generate: error: ") and message in err
    assert not out.exists()


def test_generate_with_a_model_that_does_not_load_makes_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    prompts = _write(tmp_path / "p.txt", "a red circle\n")
    assert main(["generate", "--prompts", str(prompts), "--out", str(out), "--model", "/nonexistent/pipeline"]) == 2
    assert capsys.readouterr().err.startswith("deepcache generate: error: ")
    assert not out.exists()  # no settings.json that a corrected --model would then contradict


# -- pure rules ------------------------------------------------------------------------------------------
def test_batches_are_global_and_run_whole_when_any_item_is_unfinished() -> None:
    assert pending_batches(5, 2, set()) == [[0, 1], [2, 3], [4]]
    assert pending_batches(5, 2, {0, 1, 3}) == [[2, 3], [4]]
    assert pending_batches(5, 2, {0, 1, 2, 3, 4}) == []
    batches = pending_batches(5, 2, set())
    assert shard(batches, 0, 2) == [[0, 1], [4]] and shard(batches, 1, 2) == [[2, 3]]
    with pytest.raises(ValueError, match="rank must be in 0..1"):
        shard(batches, 2, 2)


def test_not_launched_is_one_process() -> None:
    info = process_info("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed, info.device.type) == (0, 1, True, False, "cpu")


def test_params_from_json_file_or_variant_string(tmp_path: Path) -> None:
    saved = _write(tmp_path / "p.json", CacheParams(cache_interval=4, cache_branch_id=1).to_json())
    assert setting_from_args(None, str(saved)) == Setting(4, 1)
    assert setting_from_args(None, "5,0,non-uniform") == Setting(5, 0, "non-uniform")
    assert setting_from_args(Setting(2, 0), None) == Setting(2, 0)
    assert setting_from_args(None, None) == Setting(3, 0)
    with pytest.raises(ValueError, match="either --variant or --params"):
        setting_from_args(Setting(2, 0), str(saved))
    with pytest.raises(FileNotFoundError, match="no parameters file"):
        setting_from_args(None, str(tmp_path / "missing.json"))


def test_records_must_match_the_prompts_file(tmp_path: Path) -> None:
    items = [PromptItem("a", 0), PromptItem("b", 1)]
    check_finished(items, {1: {"prompt": "b", "seed": 1, "negative_prompt": None}}, tmp_path)
    with pytest.raises(ValueError, match="holds image 1 for prompt 'b' .* now gives 'c'"):
        check_finished([items[0], PromptItem("c", 1)], {1: {"prompt": "b", "seed": 1}}, tmp_path)
    with pytest.raises(ValueError, match="holds image 2 but the prompts file has only 2 items"):
        check_finished(items, {2: {"prompt": "x", "seed": 2}}, tmp_path)


def test_file_names_keep_their_width_when_prompts_are_appended(tmp_path: Path) -> None:
    from DeepCache.tools.image_store import MIN_NAME_DIGITS

    assert MIN_NAME_DIGITS == 5
    for num_items in (1, 9, 10, 11, 99_999, 100_000):  # up to 100,000 items: the same name
        assert ImageStore(tmp_path, num_items).file_name(7) == "00007.png", num_items
    assert ImageStore(tmp_path, 100_001).file_name(7) == "000007.png"  # only a larger job needs more digits


def test_store_ignores_torn_lines_and_undecodable_images(tmp_path: Path) -> None:
    from PIL import Image

    store = ImageStore(tmp_path, num_items=100)
    for index in (4, 7):
        store.save(index, Image.new("RGB", (8, 8), "red"), {"prompt": "p", "seed": index})
    assert sorted(store.finished()) == [4, 7] and store.file_name(7) == "00007.png"
    (tmp_path / "00007.png").write_bytes((tmp_path / "00007.png").read_bytes()[:40])  # a half-written file
    with open(tmp_path / "manifest.jsonl", "a") as f:
        f.write('{"index": 9, "prompt": "p", "se')  # a torn last line
    assert [r["index"] for r in read_records(tmp_path / "manifest.jsonl")] == [4, 7]
    assert sorted(store.finished()) == [4]
    store.start(store.finished())
    assert (tmp_path / "manifest.jsonl").read_text().count("\n") == 1


# -- end to end ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("prompts")
    lines = [{"prompt": p} for p in embedded_prompts(NUM_ITEMS)]
    lines[2]["seed"] = 1234  # its own seed
    lines[3]["negative_prompt"] = "a large blue circle"
    return _write(folder / "prompts.jsonl", "".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture(scope="module")
def reference(prompts_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("reference") / "out"
    start = time.perf_counter()
    assert main(["generate", "--prompts", str(prompts_file), "--out", str(out), *ARGS]) == 0
    (out.parent / "wall_seconds").write_text(str(time.perf_counter() - start))
    return out


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def _manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def _env(**more: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **more}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    return env


def test_reference_run_writes_images_manifest_and_settings(reference: Path, prompts_file: Path) -> None:
    assert sorted(_pngs(reference)) == [f"{i:05d}.png" for i in range(NUM_ITEMS)]
    records = _manifest(reference)
    assert [r["index"] for r in records] == list(range(NUM_ITEMS))
    assert [r["seed"] for r in records] == [0, 1, 1234, 3, 4]
    assert records[3]["negative_prompt"] == "a large blue circle" and records[0]["negative_prompt"] is None
    assert {r["setting"] for r in records} == {"I=3, B=0"} and {r["rank"] for r in records} == {0}
    assert all(r["file"] == f"{r['index']:05d}.png" for r in records)
    # seconds per image: its batch's generation shared out, so all of them together fit in the command's wall time
    wall = float((reference.parent / "wall_seconds").read_text())
    assert all(r["seconds"] > 0 for r in records) and sum(r["seconds"] for r in records) <= wall
    assert records[0]["seconds"] == records[1]["seconds"]  # one batch (--batch-size 2), one share
    settings = json.loads((reference / "settings.json").read_text())
    assert (settings["steps"], settings["batch_size"], settings["setting"], settings["seed"]) == (3, 2, "I=3, B=0", 0)
    assert sorted(p.name for p in reference.iterdir()) == sorted([*_pngs(reference), "manifest.jsonl", "settings.json"])
    # the same command again has nothing to do and changes nothing
    before = _pngs(reference), (reference / "manifest.jsonl").read_text()
    assert main(["generate", "--prompts", str(prompts_file), "--out", str(reference), *ARGS]) == 0
    assert (_pngs(reference), (reference / "manifest.jsonl").read_text()) == before


def test_two_processes_with_accelerate_launch_give_the_same_bytes(reference: Path, prompts_file: Path,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "out"
    # On a CPU-only machine `accelerate launch --cpu --num_processes 2` starts one process; --multi_gpu with no
    # visible GPU starts two CPU processes (gloo).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "DeepCache",
               "generate", "--prompts", str(prompts_file), "--out", str(out), *ARGS]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 process(es)" in done.stdout
    assert _pngs(out) == _pngs(reference)
    records = _manifest(out)
    assert [r["index"] for r in records] == list(range(NUM_ITEMS))
    assert [r["rank"] for r in records] == [0, 0, 1, 1, 0]  # batches [0, 1] and [4] on rank 0, [2, 3] on rank 1
    assert sorted(p.name for p in out.iterdir()) == sorted([*_pngs(out), "manifest.jsonl", "settings.json"])


def test_killed_run_resumes_to_every_item_exactly_once(reference: Path, prompts_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "DeepCache", "generate", "--prompts", str(prompts_file), "--out", str(out), *ARGS]
    killed = subprocess.run(command, env=_env(**{STOP_AFTER_VARIABLE: "3"}), capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert killed.returncode == 75, killed.stderr[-3000:]  # killed in the middle of the second batch
    assert sorted(_pngs(out)) == ["00000.png", "00001.png", "00002.png"]
    assert [r["index"] for r in _manifest(out)] == [0, 1, 2]
    assert main(["generate", "--prompts", str(prompts_file), "--out", str(out), *ARGS]) == 0
    assert _pngs(out) == _pngs(reference)
    assert [r["index"] for r in _manifest(out)] == list(range(NUM_ITEMS))


def test_half_written_image_torn_line_and_stray_temp_file_are_redone(reference: Path, prompts_file: Path,
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "00003.png").write_bytes((out / "00003.png").read_bytes()[:100])
    (out / "00004.png").unlink()
    (out / ".00004.png.tmp").write_bytes(b"\x89PNG half")
    lines = (out / "manifest.jsonl").read_text().splitlines(keepends=True)
    (out / "manifest.jsonl").write_text("".join(lines[:4]) + lines[4][:30])  # item 4's line torn
    assert main(["generate", "--prompts", str(prompts_file), "--out", str(out), *ARGS]) == 0
    assert _pngs(out) == _pngs(reference)
    assert [r["index"] for r in _manifest(out)] == list(range(NUM_ITEMS))
    assert not list(out.glob(".*"))


def test_other_settings_or_prompts_into_the_same_folder_refuse(reference: Path, prompts_file: Path, tmp_path: Path,
                                                               capsys) -> None:
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = _pngs(out), (out / "manifest.jsonl").read_text()
    other = [a if a != "3" else "4" for a in ARGS]  # --steps 4
    assert main(["generate", "--prompts", str(prompts_file), "--out", str(out), *other]) == 2
    err = capsys.readouterr().err
    assert "holds images made with other settings (steps: 3 -> 4)" in err and "use another --out" in err
    assert main(["generate", "--prompts", str(prompts_file), "--out", str(out), *ARGS, "--seed", "1"]) == 2
    assert "seed: 0 -> 1" in capsys.readouterr().err
    first = read_prompt_file(prompts_file)[0].prompt
    shorter = _write(tmp_path / "p.txt", first + "\n")
    assert main(["generate", "--prompts", str(shorter), "--out", str(out), *ARGS]) == 2
    assert "holds image 1 but the prompts file has only 1 items" in capsys.readouterr().err
    changed = _write(tmp_path / "q.txt", "a small red circle on a blue background, top left\n" * NUM_ITEMS)
    assert main(["generate", "--prompts", str(changed), "--out", str(out), *ARGS]) == 2
    assert f"holds image 0 for prompt {first!r} (seed 0), but the prompts file now gives" in capsys.readouterr().err
    assert (_pngs(out), (out / "manifest.jsonl").read_text()) == before


def test_eval_with_a_prompts_file_on_two_processes_scores_like_one(prompts_file: Path, tmp_path: Path) -> None:
    args = ["eval", "--prompts", str(prompts_file), "--steps", "3", "--variant", "3,0", "--threads", "1"]
    assert main([*args, "--json", str(tmp_path / "one.json")]) == 0
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "DeepCache",
               *args, "--json", str(tmp_path / "two.json")]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1 and ", 2 processes" in done.stdout  # only the main process reports
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["meta"]["seeds"] == two["meta"]["seeds"] == [0, 1, 1234, 3, 4]
    assert one["meta"]["negative_prompts"] == [None, None, None, "a large blue circle", None]
    assert (one["meta"]["processes"], two["meta"]["processes"]) == (1, 2)
    timing = ("seconds", "speedup")
    assert [{k: v for k, v in row.items() if k not in timing} for row in one["rows"]] == \
        [{k: v for k, v in row.items() if k not in timing} for row in two["rows"]]
    assert one["rows"][1]["psnr"] < 100  # the cached setting differs from the original


def test_eval_prompts_file_and_prompt_are_exclusive(prompts_file: Path, capsys) -> None:
    assert main(["eval", "--prompts", str(prompts_file), "--prompt", "a cat"]) == 2
    assert "give either --prompts FILE or --prompt" in capsys.readouterr().err


def test_help_documents_resume_and_launchers(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--prompts FILE", "--out DIR", "--params JSON", "--guidance-scale", "Run the same command again to "
                 "resume", "accelerate launch --num_processes N -m DeepCache generate", "torchrun --nproc_per_node N",
                 "accelerate launch --multi_gpu"):
        assert text in out


def test_negative_prompt_changes_the_image_and_empty_means_none() -> None:
    from DeepCache.tools.generate import generate_items
    from DeepCache.tools.pipelines import load_pipeline

    pipe = load_pipeline()
    prompt = embedded_prompts(1)[0]
    items = [PromptItem(prompt, 0), PromptItem(prompt, 0, ""), PromptItem(prompt, 0, "a large blue circle")]
    images = [generate_items(pipe, [item], Setting(3, 0), steps=2, guidance=4.0)[0].tobytes() for item in items]
    assert images[0] == images[1] != images[2]


def test_two_processes_killed_then_one_process_resumes(reference: Path, prompts_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "DeepCache",
               "generate", "--prompts", str(prompts_file), "--out", str(out), *ARGS]
    killed = subprocess.run(command, env=_env(**{STOP_AFTER_VARIABLE: "1"}), capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert killed.returncode != 0
    # each process stops after its first image, and the launcher then ends the other one
    made = [r["index"] for part in sorted(out.glob("manifest.rank*.jsonl")) for r in read_records(part)]
    assert 1 <= len(made) <= 2 and set(made) <= {0, 2}
    assert not (out / "manifest.jsonl").exists()  # never merged
    assert main(["generate", "--prompts", str(prompts_file), "--out", str(out), *ARGS]) == 0
    assert _pngs(out) == _pngs(reference)
    assert [r["index"] for r in _manifest(out)] == list(range(NUM_ITEMS))
    assert sorted(p.name for p in out.iterdir()) == sorted([*_pngs(out), "manifest.jsonl", "settings.json"])
