"""Where ``deepcache generate`` keeps its work: numbered PNGs, a manifest, and the settings they were made with.

An output folder holds ``<index>.png`` (zero-padded), ``manifest.jsonl`` (one JSON object per finished image) and
``settings.json`` (everything that decides the pixels). The rules that make a run resumable after a kill at any
moment:

* an image is written to a hidden temporary file in the same folder and renamed into place (``os.replace``), so a
  PNG under its final name is always complete;
* its manifest line is appended (flushed and fsynced) only after the rename, so every recorded item has its image;
* a torn last line (no newline, or not JSON) is ignored when reading, and the file is rewritten cleanly;
* an item is done only if it is in a manifest *and* its PNG exists and decodes; anything else is redone.

With several processes, process ``k`` appends to its own ``manifest.rank<k>.jsonl`` (never two writers on one
file); the main process merges the parts into ``manifest.jsonl`` at the end (:meth:`ImageStore.merge`). A single
process appends to ``manifest.jsonl`` itself. Reading always looks at the manifest and every part.

Example::

    >>> import tempfile
    >>> from PIL import Image
    >>> store = ImageStore(tempfile.mkdtemp(), num_items=12)
    >>> store.start({})
    >>> store.file_name(3)
    '00003.png'
    >>> store.save(3, Image.new("RGB", (4, 4)), {"prompt": "a red circle", "seed": 3})
    >>> sorted(store.finished())
    [3]
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["MANIFEST", "MIN_NAME_DIGITS", "SETTINGS", "ImageStore", "read_records", "settings_mismatch"]

MANIFEST = "manifest.jsonl"
SETTINGS = "settings.json"
_PART = re.compile(r"^manifest\.rank(\d+)\.jsonl$")
_TEMP_SUFFIX = ".tmp"
#: File names have at least this many digits, so appending prompts to a job of under 100,000 items never changes
#: the name an item's image gets.
MIN_NAME_DIGITS = 5


def read_records(path: Path) -> list[dict[str, Any]]:
    """The complete records of a manifest file: lines that end with a newline and hold a JSON object with an
    ``index``; anything else (a torn last line, garbage) is skipped. A missing file has none.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.jsonl"
    >>> _ = p.write_text('{"index": 0}\\n{"index": 1}\\n{"ind')
    >>> read_records(p)
    [{'index': 0}, {'index': 1}]
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    records = []
    for line in text.split("\n")[:-1]:  # the part after the last newline is torn (or empty)
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("index"), int):
            records.append(record)
    return records


def settings_mismatch(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ between two settings records, as ``key: saved -> wanted`` lines.

    >>> settings_mismatch({"steps": 25, "seed": 0}, {"steps": 10, "seed": 0})
    ['steps: 25 -> 10']
    """
    return [f"{key}: {saved.get(key)!r} -> {wanted.get(key)!r}" for key in sorted(set(saved) | set(wanted))
            if saved.get(key) != wanted.get(key)]


def _write_atomically(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}{_TEMP_SUFFIX}")
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


class ImageStore:
    """The output folder of one generation job, as seen by process ``rank`` of ``world_size``.

    File names are zero-padded to ``MIN_NAME_DIGITS`` digits, or more when ``num_items`` (the size of the whole
    job) needs them.
    """

    def __init__(self, folder: str | Path, num_items: int, rank: int = 0, world_size: int = 1) -> None:
        self.folder = Path(folder)
        self.width = max(MIN_NAME_DIGITS, len(str(max(num_items - 1, 0))))
        self.rank, self.world_size = rank, world_size

    # -- names ----------------------------------------------------------------------------------------
    def file_name(self, index: int) -> str:
        return f"{index:0{self.width}d}.png"

    @property
    def own_manifest(self) -> Path:
        """The file this process appends to: the manifest itself for one process, its part for several."""
        return self.folder / (MANIFEST if self.world_size == 1 else f"manifest.rank{self.rank}.jsonl")

    def manifest_files(self) -> list[Path]:
        """The merged manifest and every part left by any process of this or an earlier run."""
        if not self.folder.is_dir():
            return [self.folder / MANIFEST]
        parts = sorted((p for p in self.folder.iterdir() if _PART.match(p.name)), key=lambda p: p.name)
        return [self.folder / MANIFEST, *parts]

    # -- settings -------------------------------------------------------------------------------------
    def check_settings(self, wanted: Mapping[str, Any]) -> bool:
        """Raise ``ValueError`` if the folder was started with other settings; return whether it has any yet."""
        path = self.folder / SETTINGS
        if not path.exists():
            return False
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise ValueError(f"{path} is not valid JSON; delete it (or the folder) to start over.") from None
        differences = settings_mismatch(saved, json.loads(json.dumps(wanted)))
        if differences:
            raise ValueError(
                f"{self.folder} holds images made with other settings ({'; '.join(differences)}); use another --out, "
                "repeat the settings recorded in settings.json, or delete the folder to start over."
            )
        return True

    def write_settings(self, wanted: Mapping[str, Any]) -> None:
        """Record the settings (creating the folder)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.folder / SETTINGS, (json.dumps(wanted, indent=1) + "\n").encode())

    # -- records --------------------------------------------------------------------------------------
    def records(self) -> dict[int, dict[str, Any]]:
        """Every complete record in the manifest and its parts, by index (the first one of an index wins)."""
        found: dict[int, dict[str, Any]] = {}
        for path in self.manifest_files():
            for record in read_records(path):
                found.setdefault(record["index"], record)
        return found

    def finished(self) -> dict[int, dict[str, Any]]:
        """The records whose image exists and decodes: the items that are done."""
        return {index: record for index, record in self.records().items()
                if self._decodes(self.folder / str(record.get("file", self.file_name(index))))}

    @staticmethod
    def _decodes(path: Path) -> bool:
        from PIL import Image

        try:
            with Image.open(path) as image:
                image.load()
        except (OSError, ValueError, SyntaxError):
            return False
        return True

    def start(self, done: Mapping[int, dict[str, Any]]) -> None:
        """Rewrite this process's manifest file cleanly before appending to it (no torn line stays).

        One process: the manifest becomes exactly ``done`` and the parts of an earlier multi-process run are folded
        in. Several: a process keeps the complete lines of its own part whose items are in ``done``.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.world_size == 1:
            self._rewrite_manifest(done.values())
        else:
            path = self.own_manifest
            if path.exists():
                kept = [r for r in read_records(path) if r["index"] in done]
                _write_atomically(path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def save(self, index: int, image: Any, record: Mapping[str, Any]) -> None:
        """Write image ``index`` atomically, then append its manifest record (with ``index``, ``file``, ``rank``)."""
        import io

        name = self.file_name(index)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        _write_atomically(self.folder / name, buffer.getvalue())
        line = json.dumps({"index": index, **record, "file": name, "rank": self.rank}) + "\n"
        with open(self.own_manifest, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def merge(self) -> dict[int, dict[str, Any]]:
        """Main process, after every process finished: one clean ``manifest.jsonl`` of the finished items (sorted by
        index), the parts deleted, stray temporary files removed. Returns the finished records."""
        done = self.finished()
        self._rewrite_manifest(done.values())
        for stray in self.folder.glob(f".*{_TEMP_SUFFIX}"):
            stray.unlink(missing_ok=True)
        return done

    def _rewrite_manifest(self, records: Iterable[Mapping[str, Any]]) -> None:
        ordered = sorted(records, key=lambda r: r["index"])
        _write_atomically(self.folder / MANIFEST, "".join(json.dumps(r) + "\n" for r in ordered).encode())
        for part in self.manifest_files()[1:]:
            part.unlink(missing_ok=True)
