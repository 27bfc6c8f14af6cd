"""A tiny CLIP tokenizer, generated: the byte-level CLIP layout with a handful of merges.

The layout is the real one (openai/clip-vit-large-patch14), only shorter: the 256 byte-level
characters, the same 256 with the end-of-word marker `</w>`, one token per merge in merge order,
then `<|startoftext|>` and `<|endoftext|>` as the two highest ids. Every text encodes (unknown
words fall back to bytes), and the words in `TINY_WORDS` encode to one token each, so tests can
read prompts token by token.
"""

from __future__ import annotations

import itertools
import json
from functools import cache
from pathlib import Path

import attrs

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77

TINY_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "in", "on", "with", "and", "photo", "picture", "image", "painting",
    "portrait", "landscape", "cat", "dog", "house", "car", "tree", "sky", "red", "green", "blue",
    "white", "black", "high", "quality", "edge", "map", "depth", "pose", "canny", "scribble",
    "circle", "square", "prompt", "test",
)  # fmt: skip
"""Words that get merges, so that each encodes to a single token."""


@attrs.frozen
class TokenizerIds:
    """The special ids of a generated tokenizer, for the matching text encoder config."""

    vocab_size: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int


@cache
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable characters.

    Printable bytes map to themselves; the rest are moved to code points from 256 up, so that
    no byte maps to whitespace or a control character. The order fixes the first 256 ids,
    which is why "!" (byte 33) is id 0, the pad token of the OpenCLIP tokenizers.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE as CLIP runs it: merge the lowest-ranked adjacent pair until no pair has a rank."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), pair) for pair in itertools.pairwise(symbols)]
        rank, (left, right) = min(pairs)
        if rank == len(ranks):
            return symbols
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == left and symbols[i + 1] == right:
                merged.append(left + right)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def _word_symbols(word: str) -> list[str]:
    chars = [bytes_to_unicode()[b] for b in word.encode("utf-8")]
    return [*chars[:-1], chars[-1] + END_OF_WORD]


@cache
def tiny_merges() -> tuple[tuple[str, str], ...]:
    """Merges that make every word of `TINY_WORDS` one token.

    Words are added one by one: run the merges so far on the word, then join what is left left
    to right with new merges. New merges rank below all earlier ones, so they never fire before
    an earlier word is complete, and every word stays one token.
    """
    ranks: dict[tuple[str, str], int] = {}
    for word in TINY_WORDS:
        symbols = _apply_merges(_word_symbols(word), ranks)
        head = symbols[0]
        for symbol in symbols[1:]:
            ranks[(head, symbol)] = len(ranks)
            head += symbol
    return tuple(ranks)


@cache
def tiny_vocab() -> dict[str, int]:
    """Token -> id in CLIP's order; the two special tokens get the highest ids."""
    base = list(bytes_to_unicode().values())
    tokens = [*base, *(c + END_OF_WORD for c in base)]
    seen = set(tokens)
    for left, right in tiny_merges():
        if left + right not in seen:
            tokens.append(left + right)
            seen.add(left + right)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}


def write_clip_tokenizer(folder: Path, *, pad_token: str) -> TokenizerIds:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt and its configs).

    `pad_token` is what the real model pads with: `<|endoftext|>` for the OpenAI CLIP-L
    tokenizers (SD 1.5, SDXL's first), "!" for the OpenCLIP ones (SD 2.1, SDXL's second).
    """
    vocab = tiny_vocab()
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} is not in the tiny vocabulary")
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "vocab.json", vocab)
    merges = "".join(f"{left} {right}\n" for left, right in tiny_merges())
    (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
    }
    _write_json(folder / "special_tokens_map.json", special)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    _write_json(folder / "tokenizer_config.json", config)
    return TokenizerIds(len(vocab), vocab[BOS_TOKEN], vocab[EOS_TOKEN], vocab[pad_token])


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
