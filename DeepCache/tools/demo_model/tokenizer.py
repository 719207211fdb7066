"""A real ``transformers.CLIPTokenizer`` built offline from a small word list.

CLIP's tokenizer is byte-level BPE with ``</w>`` marking the end of a word. Here the merges are
learnt (ordinary BPE training: repeatedly merge the most frequent adjacent pair) on the caption
words only, until every word is one token; the vocabulary is the 256 byte symbols, the same with
``</w>``, every merge result, then ``<|startoftext|>`` and ``<|endoftext|>``. Words outside the
list still tokenize (into smaller pieces), as with any BPE tokenizer.

Example::

    >>> from DeepCache.tools.demo_model.tokenizer import build_tokenizer
    >>> tok = build_tokenizer(["a", "red", "circle", ","], max_length=16)
    >>> ids = tok("a red circle,")["input_ids"]
    >>> tok.convert_ids_to_tokens(ids)
    ['<|startoftext|>', 'a</w>', 'red</w>', 'circle</w>', ',</w>', '<|endoftext|>']
"""

from __future__ import annotations

import collections
import itertools
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

from transformers import CLIPTokenizer

END_OF_WORD = "</w>"
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _symbols(word: str, byte_map: dict[int, str]) -> tuple[str, ...]:
    chars = [byte_map[b] for b in word.encode("utf-8")]
    return tuple(chars[:-1]) + (chars[-1] + END_OF_WORD,)


def learn_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges (most frequent pair first, ties broken alphabetically) until each word is one symbol."""
    if not words:
        raise ValueError("words is empty; pass the words the tokenizer must keep whole.")
    byte_map = bytes_to_unicode()
    segmented = [_symbols(w, byte_map) for w in dict.fromkeys(words)]
    merges: list[tuple[str, str]] = []
    while True:
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        for symbols in segmented:
            counts.update(itertools.pairwise(symbols))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        segmented = [_merge(symbols, best) for symbols in segmented]


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def build_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Byte symbols, byte symbols with ``</w>``, merge results, then BOS and EOS (CLIP's layout)."""
    base = list(bytes_to_unicode().values())
    tokens = base + [b + END_OF_WORD for b in base] + ["".join(pair) for pair in merges] + [BOS, EOS]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}


def write_tokenizer_files(words: Sequence[str], directory: str | Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` for ``words`` into ``directory``; returns both paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(words)
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    vocab_path.write_text(json.dumps(build_vocab(merges), ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab_path, merges_path


def build_tokenizer(words: Sequence[str], max_length: int) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` that keeps each of ``words`` as one token, padding/truncating to ``max_length``."""
    if max_length < 3:
        raise ValueError(f"max_length must be >= 3 (BOS, one token, EOS), got {max_length}.")
    with tempfile.TemporaryDirectory() as tmp:
        vocab_path, merges_path = write_tokenizer_files(words, tmp)
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        merges = [tuple(line.split()) for line in merges_path.read_text(encoding="utf-8").splitlines()[1:] if line]
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # (a, b) pairs are accepted as well
        model_max_length=max_length,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
    )
    return tokenizer
