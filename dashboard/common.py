"""What every page shares: the signed-in user and masking, the empty-database message, the filter bar."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime, time, timedelta

import pandas as pd
import streamlit as st

from core import csvsafe
from core.analytics import Filters
from core.auth import mask_number
from dashboard import data
from dashboard.login import SESSION_KEY

ALL = "All"
SIMULATE = "python -m core simulate"
# Columns that hold a user's phone number (WhatsApp wa_id) in any frame a page shows or exports.
NUMBER_COLUMNS = ("user_id",)


def user() -> dict[str, str]:
    return dict(st.session_state.get(SESSION_KEY) or {"name": "?", "role": "viewer"})


def is_admin() -> bool:
    return user().get("role") == "admin"


def masked(frame: pd.DataFrame, columns: Iterable[str] = NUMBER_COLUMNS) -> pd.DataFrame:
    """Phone numbers hidden but for their last digits, unless the signed-in user is an admin."""
    if is_admin() or frame.empty:
        return frame
    out = frame.copy()
    for column in columns:
        if column in out.columns:
            out[column] = out[column].map(mask_number)
    return out


def table(frame: pd.DataFrame, **options: object) -> None:
    """A table of values users or operators typed (names, texts, ids): shown as its own "Download as CSV" writes
    them, with formula-like cells neutralised (core.csvsafe), so that download is as safe as our CSV exports."""
    st.dataframe(csvsafe.safe_frame(frame), **options)


def no_traffic() -> bool:
    """True (after explaining what to do) when the database holds no conversation yet."""
    if data.has_traffic(data.url()):
        return False
    st.info(
        "No conversations yet. Send some traffic first — for a demo week of realistic users run "
        f"`{SIMULATE}` (or point your WhatsApp app's webhook at `python -m core serve`) and reload this page."
    )
    return True


def _choice(label: str, options: list[str], key: str) -> str | None:
    picked = st.selectbox(label, [ALL, *options], key=key)
    return None if picked == ALL else picked


def day_range(picked: object, default_days: int) -> tuple[datetime, datetime]:
    """A date_input value (one day or a pair) → the half-open UTC range [first day 00:00, day after last)."""
    today = datetime.now(UTC).date()
    days: list[date] = list(picked) if isinstance(picked, (tuple, list)) else [picked] if picked else []
    first = days[0] if days else today - timedelta(days=default_days)
    last = days[-1] if days else today
    return datetime.combine(first, time(), UTC), datetime.combine(last, time(), UTC) + timedelta(days=1)


def filter_bar(prefix: str, *, flow_required: bool = False, language: bool = True, dates: bool = True,
               default_days: int = 30) -> Filters:
    """Flow / business number / language / date range selectors; their keys start with `prefix`."""
    options = data.filter_options(data.url())
    flows = sorted(set(options["flow"])) if not options.empty else data.registry().names()
    numbers = sorted(set(options["phone_number_id"])) if not options.empty else []
    languages = sorted(set(options["language"])) if not options.empty else []
    columns = st.columns(4 if dates else 3)
    with columns[0]:
        if flow_required:
            flow = st.selectbox("Flow", flows, key=f"{prefix}_flow")
        else:
            flow = _choice("Flow", flows, f"{prefix}_flow")
    with columns[1]:
        number = _choice("Business number", numbers, f"{prefix}_number")
    with columns[2]:
        lang = _choice("Language", languages, f"{prefix}_language") if language else None
    since = until = None
    if dates:
        with columns[3]:
            today = datetime.now(UTC).date()
            picked = st.date_input(
                "Date range (UTC)", value=(today - timedelta(days=default_days), today), key=f"{prefix}_dates"
            )
        since, until = day_range(picked, default_days)
    return Filters(flow=flow, phone_number_id=number, language=lang, since=since, until=until)


def seconds_label(seconds: float | None) -> str:
    if seconds is None or pd.isna(seconds):
        return "–"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"
