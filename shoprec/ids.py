"""Text ids (SKUs, UUIDs, hashed e-mails) as the integer ids the server speaks.

Requests, responses, the user store and every table carry int64 user and item ids. A shop whose ids are
text loads its files with `shoprec data --source interactions --string-ids`: each id is replaced by
`key_id(text)`, a stable hash of its UTF-8 bytes (BLAKE2b, the first KEY_BITS bits). The same text gives
the same id in every file, every run and every process, so an application asks for a user with
`key_id("c0ffee-42")` and needs no map from the training data. The raw tables keep the text beside the id
(`item_key`, `user_key`) to show which item a served id is.

KEY_BITS = 53: every id is exact as a float64 and as a JSON number in any language (JavaScript's
integers stop at 2^53), and never negative. Two texts that hash alike are refused when the data is
loaded, naming both (the chance is about n^2 / 2^54 for n distinct texts: 1 in 18,000 for a million); an
id first seen later (a new user's request, an event) is not checked against them.
"""

from __future__ import annotations

import hashlib
import numbers

KEY_BITS = 53
_SHIFT = 64 - KEY_BITS


def key_id(key: str) -> int:
    """The integer id of a text id: stable across runs, processes and machines; 0 <= id < 2**KEY_BITS.
    Surrounding spaces are not part of the key (files are read that way too)."""
    if not isinstance(key, str):
        raise TypeError(f"key_id: a text id is a str, not {type(key).__name__}")
    text = key.strip()
    if not text:
        raise ValueError("key_id: empty text id")
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") >> _SHIFT


def id_text(value: object) -> str | None:
    """A value read as a text id: str as is, UTF-8 bytes decoded, an integer in decimal; None for anything else (a
    float or a boolean: `7.0` and `7` must not become two ids because of how a file stored them)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    return None
