"""Caption keys: how captions are identified in the index and in the embedding cache."""

from __future__ import annotations

import hashlib

CAPTION_KEY_BYTES = 16


def caption_key(caption: str) -> bytes:
    """A 16-byte BLAKE2b digest of the caption's UTF-8 text.

    The text is hashed exactly as written (no stripping or case folding), so two captions share
    a key, and an embedding, only when the text encoder would see the same string.
    """
    return hashlib.blake2b(caption.encode("utf-8"), digest_size=CAPTION_KEY_BYTES).digest()


def caption_key_hex(caption: str) -> str:
    """`caption_key` as 32 lowercase hex digits."""
    return caption_key(caption).hex()
