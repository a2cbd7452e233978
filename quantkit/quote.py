"""Quoting user content in messages: bounded, and printable whatever bytes it came from.

Error messages quote names and values taken from the user's files (tensor names in an ONNX, state_dict keys,
recipe values, file names). Those are unbounded — a 50 MB tensor name is a valid ONNX — and file names on
Linux are bytes that need not be UTF-8 (Python holds them as str with lone surrogates, ``surrogateescape``),
which a UTF-8 encoder refuses. ``cap`` bounds what a message quotes; ``printable`` makes a name safe to print,
log or write into UTF-8 JSON/Markdown, escaping the undecodable bytes as ``\\xNN``.
"""

from __future__ import annotations

import os
import re

#: Characters of user content one message quotes at most (a tensor name, a key, a value).
QUOTE_LIMIT = 200
#: The safety net under every QuantkitError (``bound_message``): a run of non-space characters longer than this
#: (a name nobody capped) is cut, and a message longer than MESSAGE_LIMIT keeps its start and its end.
TOKEN_LIMIT = 500
MESSAGE_LIMIT = 4000
_LONG_TOKEN = re.compile(r"\S{%d,}" % (TOKEN_LIMIT + 1))


def printable(value: object) -> str:
    """``value`` as text that encodes to UTF-8: a path or bytes is decoded with ``os.fsdecode``, and bytes that
    are not valid UTF-8 (lone surrogates from ``surrogateescape``) appear as ``\\xNN``. Valid text is unchanged."""
    if isinstance(value, (bytes, os.PathLike)):
        value = os.fsdecode(value)
    text = str(value)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogateescape") if _only_escapes(text) else None
        if raw is not None:
            return raw.decode("utf-8", "backslashreplace")
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _only_escapes(text: str) -> bool:
    try:
        text.encode("utf-8", "surrogateescape")
        return True
    except UnicodeEncodeError:
        return False


def cap(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``value`` as printable text of at most about ``limit`` characters: a longer one keeps its first ``limit``
    characters and says how long it was, ``'abc... (50000000 chars)'``."""
    text = printable(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} chars)"


def qcap(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr``-style quote of ``value`` bounded like :func:`cap`: ``'name'`` or ``'nam... (N chars)'``."""
    text = printable(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} chars)"


def bound_message(text: str) -> str:
    """``text`` with every run of more than TOKEN_LIMIT non-space characters cut to its first QUOTE_LIMIT plus
    ``... (N chars)``, then, if still over MESSAGE_LIMIT characters, its first two thirds and last third of that
    limit around ``... (N chars left out) ...`` (a message says the fix last). Short messages are unchanged."""
    if len(text) <= TOKEN_LIMIT:
        return text
    text = _LONG_TOKEN.sub(lambda m: f"{m[0][:QUOTE_LIMIT]}... ({len(m[0])} chars)", text)
    if len(text) > MESSAGE_LIMIT:
        head, tail = text[: MESSAGE_LIMIT * 2 // 3], text[-(MESSAGE_LIMIT // 3):]
        text = f"{head} ... ({len(text) - len(head) - len(tail)} chars left out) ... {tail}"
    return text
