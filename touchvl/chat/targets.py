"""Provider-specific rules for the chat fine-tuning validator, on top of OpenAI's (tasks/jsonl_validate.py).

``target`` names the service a file is meant for.  ``openai`` (also what Azure OpenAI and most
OpenAI-compatible services take) adds nothing; ``together`` adds Together AI's own limits, from its
vision fine-tuning guide (docs.together.ai/docs/fine-tuning/vision) and the data checks its SDK used
to run client-side (together ``utils/files.py``, now run server-side after upload):

* images only as base64 data URLs with a MIME type prefix -- ``data:image/jpeg``, ``image/png`` or
  ``image/webp`` (the SDK's guide: "if your data references URLs, download and encode the images
  first"); at most 10 per example, 10 MB each (the OpenAI checks already cover count, size, decoding
  and the declared type matching the bytes);
* roles ``system``, ``user``, ``assistant``, ``tool``; the system message only first; after it the
  roles alternate (no two consecutive messages of one role);
* ``weight``, where present, the integer 0 or 1;
* a conversational line holds ``messages`` and optionally ``tools``, nothing else.

Each check returns findings; the validator adds them to the line's errors.
"""
from __future__ import annotations

import re
from typing import Callable

TARGETS = ("openai", "together")
TOGETHER_MIME_TYPES = ("image/jpeg", "image/png", "image/webp")
TOGETHER_LINE_KEYS = {"messages", "tools"}
_DATA_URL_MIME = re.compile(r"^data:(?P<mime>[^;,]+);base64,", re.IGNORECASE)


def together_errors(obj: dict) -> list[tuple[str, str]]:
    """(code, message) for what Together refuses that OpenAI's rules let through."""
    out: list[tuple[str, str]] = []
    for key in sorted(set(obj) - TOGETHER_LINE_KEYS):
        out.append(("unrecognized_key", f"key '{key}': a Together conversational line holds only 'messages' (and 'tools')"))
    messages = obj.get("messages")
    if not isinstance(messages, list):
        return out  # the OpenAI rules already name this
    previous = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        where = f"messages[{i}]"
        role = message.get("role")
        if role == "system" and i > 0:
            out.append(("role_order", f"{where}: the system message must come first"))
        elif isinstance(role, str) and role == previous:
            out.append(("roles_not_alternating", f"{where}: two '{role}' messages in a row; after the optional system "
                                                 "message Together needs user/assistant turns to alternate"))
        previous = role if isinstance(role, str) else None
        if "weight" in message and (type(message["weight"]) is not int or message["weight"] not in (0, 1)):
            out.append(("weight_invalid", f"{where}: weight must be the integer 0 or 1, got {message['weight']!r}"))
        content = message.get("content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            if not isinstance(part, dict) or part.get("type") != "image_url":
                continue
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str):
                continue  # image_url_invalid already
            match = _DATA_URL_MIME.match(url)
            if match is None:
                out.append(("image_not_base64", f"{where}.content[{j}]: Together takes images only as base64 data URLs "
                                                f"(data:image/jpeg;base64,...), got {url[:40]!r}"))
            elif match["mime"].lower() not in TOGETHER_MIME_TYPES:
                out.append(("image_mime_unsupported", f"{where}.content[{j}]: MIME type {match['mime']!r}; Together "
                                                      f"accepts {', '.join(TOGETHER_MIME_TYPES)}"))
    return out


CHECKS: dict[str, Callable[[dict], list[tuple[str, str]]]] = {"openai": lambda obj: [], "together": together_errors}
