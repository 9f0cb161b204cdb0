"""What may go into a log line: user ids masked, strings from payloads escaped and cut short.

Logs are kept longer and read by more people than the database, so a log line never carries a user's phone
number or message text; `masked` keeps the last 4 characters, enough to tell users apart while debugging (the
admin API shows the full record). Anything a sender controls (error titles, field names, flow values, exception
texts that quote them) goes through `clean`: control characters, `\\n` and `\\r` included, are escaped the way
`repr` does, so a payload cannot start a forged log line, and the result is cut at `MAX_CHARS`.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_CHARS = 200
VISIBLE_DIGITS = 4


def clean(value: object, limit: int = MAX_CHARS) -> str:
    """`value` as one printable line of at most about `limit` characters."""
    text = value if isinstance(value, str) else str(value)
    if not text.isprintable() or "\\" in text:
        # repr escapes exactly the non-printable characters (and the backslash, so an escape cannot be faked).
        text = repr(text)[1:-1]
    if len(text) > limit:
        return f"{text[:limit]}...[{len(text) - limit} more]"
    return text


def masked(user_id: object) -> str:
    """A user id / phone number with all but its last 4 characters hidden: 34600123456 -> ***3456."""
    if user_id is None:
        return "-"
    text = clean(user_id, limit=64)
    return "***" + text[-VISIBLE_DIGITS:] if len(text) > VISIBLE_DIGITS else "***"


def key(session_key: Sequence[object]) -> str:
    """A session key (phone_number_id, user_id) for the log: the business number as is, the user masked."""
    phone_number_id, user_id = session_key[0], session_key[1]
    return f"{clean(phone_number_id, limit=64)}/{masked(user_id)}"
