"""What an inbound value may be before we store it: every bound a webhook message or status is held to, in one place.

A value outside these bounds would fail the shared INSERT on PostgreSQL (a NUL character, a string longer than its
column, an integer a column cannot hold) or break a reader later (a timestamp past year 9999 overflows the 24 h
window, a latitude of 310 digits overflows a float). SQLite accepts most of them, so the bounds are checked in
Python at parse time, the same for both backends: a message that breaks one goes to the quarantine with the
reason, a status is skipped with a note (core.payloads). Pure: no I/O, no clock (the receiving time is given).
"""

from __future__ import annotations

import math
import re
from typing import Any

from core.errors import WaflowError

# --------------------------------------------------------------------------- bodies (checked before parsing)

# Meta sends bodies up to 3 MB; the webhook answers 413 above this cap, before reading further.
MAX_BODY_BYTES = 3 * 1024 * 1024 + 64 * 1024
# Real payloads nest about 10 levels; json.loads recurses per level and raises RecursionError when deep.
MAX_DEPTH = 64

# --------------------------------------------------------------------------- strings: column widths (core/models.py)

MAX_PHONE_NUMBER_ID_CHARS = 64  # sessions.phone_number_id and every session key
MAX_USER_ID_CHARS = 128  # sessions.user_id (`from`, `from_user_id`, a changed number's new id, a status recipient)
MAX_WAMID_CHARS = 256  # inbound_events.wamid, transitions.wamid, message_status.wamid
MAX_KIND_CHARS = 32  # inbound_events.kind (the message `type`)
MAX_PROFILE_NAME_CHARS = 256  # sessions.profile_name
MAX_REFERENCE_CHARS = 256  # context.id and reaction.message_id: outbound wamids, compared with outbox.wamid
MAX_STATUS_CHARS = 16  # message_status.status, message_status_events.status
MAX_PRICING_CHARS = 32  # message_status.pricing_category, message_status.pricing_model
# Free text (a message body, a caption, a file name, any other string or key in a stored message): WhatsApp's own
# limit for one message is 65,536 characters.
MAX_TEXT_CHARS = 65_536
# Meta's limit for biz_opaque_callback_data, which comes back on statuses (we put our outbox id there).
MAX_OPAQUE_CHARS = 512

# --------------------------------------------------------------------------- numbers

# Any number in a stored message: an integer a BIGINT and every JSON reader hold exactly, a float finite and no
# larger (PostgreSQL's jsonb prints 1e300 back as a 301-digit integer).
MAX_JSON_NUMBER = 2**63 - 1
# Status error codes go to INTEGER columns (message_status.error_code, outbox.error_code).
MAX_ERROR_CODE = 2**31 - 1
LATITUDE_RANGE = (-90.0, 90.0)
LONGITUDE_RANGE = (-180.0, 180.0)

# --------------------------------------------------------------------------- timestamps (Unix seconds)

# 9999-01-01T00:00:00Z: a year of headroom below datetime's limit for the 24 h window, campaign delays and the like.
MAX_TIMESTAMP = 253_370_764_800
# How far ahead of the receiving clock a message may be dated (clock skew); old messages and replays are fine.
MAX_SECONDS_AHEAD = 24 * 3600

_SURROGATE = re.compile("[\ud800-\udfff]")


class OutOfBounds(WaflowError):
    """A value outside its bound; the message names where (relative to the message or status) and why."""


def check_text(where: str, value: str, limit: int = MAX_TEXT_CHARS) -> None:
    """A string PostgreSQL can store (TEXT and JSONB refuse NUL; UTF-8 cannot encode a lone surrogate), of at most
    `limit` characters."""
    if len(value) > limit:
        raise OutOfBounds(f"{where} is longer than {limit} characters ({len(value)})")
    if "\x00" in value:
        raise OutOfBounds(f"{where} contains a NUL character")
    if not value.isascii() and _SURROGATE.search(value):
        raise OutOfBounds(f"{where} contains an unpaired UTF-16 surrogate")


def check_optional_text(where: str, value: str | None, limit: int) -> None:
    if value is not None:
        check_text(where, value, limit)


def describe_number(value: float) -> str:
    digits = str(value)
    return f"a {len(digits.lstrip('-'))}-digit integer" if len(digits) > 24 and isinstance(value, int) else digits


def check_number(where: str, value: float) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise OutOfBounds(f"{where} is not a finite number ({value})")
    if not -MAX_JSON_NUMBER <= value <= MAX_JSON_NUMBER:
        raise OutOfBounds(f"{where} is out of range ({describe_number(value)})")


class _Found(Exception):
    """A problem deep in a JSON document; each level adds its key on the way up, so the walk builds no paths."""

    def __init__(self, problem: OutOfBounds) -> None:
        self.problem = problem
        self.parts: list[str] = []


def check_json(where: str, doc: Any) -> None:
    """Every string (keys too) and number of a JSON document within its bounds; `where` names the document."""
    try:
        _walk(doc)
    except _Found as found:
        path = where + "".join(reversed(found.parts))
        raise OutOfBounds(f"{path}{found.problem}") from None


def _walk(doc: Any) -> None:
    if isinstance(doc, str):
        _leaf(check_text, doc)
    elif isinstance(doc, dict):
        for key, item in doc.items():
            try:
                if isinstance(key, str):
                    _leaf(check_text, key, suffix=" (a key)")
                _walk(item)
            except _Found as found:
                found.parts.append(_key_part(key))
                raise
    elif isinstance(doc, list):
        for index, item in enumerate(doc):
            try:
                _walk(item)
            except _Found as found:
                found.parts.append(f"[{index}]")
                raise
    elif isinstance(doc, (int, float)) and not isinstance(doc, bool):
        _leaf(check_number, doc)


def _key_part(key: object) -> str:
    if isinstance(key, str) and key.isidentifier() and len(key) <= 64:
        return f".{key}"
    shown = repr(key)
    return f"[{shown if len(shown) <= 40 else shown[:37] + '...'}]"


def _leaf(check: Any, value: Any, suffix: str = "") -> None:
    try:
        check("", value)
    except OutOfBounds as e:
        raise _Found(OutOfBounds(f"{suffix}{e}")) from None


def check_timestamp(where: str, digits: str, now: int | None) -> int:
    """Unix seconds (already known to be an ASCII digit string) no later than year 9999 and, when the receiving time
    `now` is given, no more than MAX_SECONDS_AHEAD ahead of it."""
    significant = digits.lstrip("0") or "0"
    if len(significant) > len(str(MAX_TIMESTAMP)) or int(significant) > MAX_TIMESTAMP:
        shown = significant if len(significant) <= 24 else f"{significant[:20]}... ({len(significant)} digits)"
        raise OutOfBounds(f"{where} {shown} is after 9999-01-01")
    seconds = int(significant)
    if now is not None and seconds > now + MAX_SECONDS_AHEAD:
        raise OutOfBounds(f"{where} {seconds} is more than {MAX_SECONDS_AHEAD // 3600} hours ahead of the receiving "
                          "clock")
    return seconds


def check_range(where: str, value: float, bounds: tuple[float, float]) -> None:
    low, high = bounds
    if not low <= value <= high:
        raise OutOfBounds(f"{where} {value} is outside {low:g}..{high:g}")


def check_opaque(where: str, value: str | None) -> None:
    """biz_opaque_callback_data that looks like a number is read as our outbox id (core.statuses): it must be one."""
    if value and value.isdigit() and not (value.isascii() and len(value) <= 19 and int(value) <= MAX_JSON_NUMBER):
        raise OutOfBounds(f"{where} {value[:24]!r} is not an outbox id")


def check_error_codes(where: str, errors: list[dict[str, Any]]) -> None:
    """Error codes a status writes to INTEGER columns: numbers, or digit strings (core.statuses reads both)."""
    for i, error in enumerate(errors):
        code = error.get("code")
        if isinstance(code, str) and code.isdigit():
            if not (code.isascii() and len(code) <= 10 and int(code) <= MAX_ERROR_CODE):
                raise OutOfBounds(f"{where}[{i}].code {code[:20]!r} is not an error code")
        elif isinstance(code, int) and not isinstance(code, bool) and not -MAX_ERROR_CODE <= code <= MAX_ERROR_CODE:
            raise OutOfBounds(f"{where}[{i}].code is out of range ({describe_number(code)})")
