"""CSV that a spreadsheet opens as data, never as formulas: every CSV waflow writes goes through here.

Excel, LibreOffice and Google Sheets run a cell that starts with `=`, `+`, `-` or `@` (and, after a tab or a
carriage return, whatever follows) as a formula, so a user-controlled value such as `=HYPERLINK(...)` or
`-2+3+cmd|'/C calc'!A0` would execute on an operator's machine. Following OWASP's advice on CSV injection, such a
text cell is written with a leading single quote, which spreadsheets show as plain text.

Numbers stay numbers: numeric columns are never touched, so `-3.5` in a float column is written as `-3.5`, and a
text cell that is nothing but a plain decimal number (`-12`, `+34600123456`, `-1.5e3`) is left as it is, since a
spreadsheet reads it as that number and it cannot hold a formula. Anything else starting with a trigger, for
example `-1+1` or `+34 600`, is quoted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import IO, Any

import pandas as pd

FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def safe_cell(value: Any) -> Any:
    """`value` as a spreadsheet should show it: a text starting with a formula trigger gets a leading quote."""
    if isinstance(value, str) and value.startswith(FORMULA_TRIGGERS) and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def safe_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of `frame` whose text cells and column names are safe to open in a spreadsheet."""
    out = frame.copy()
    for column in out.columns:
        series = out[column]
        if pd.api.types.is_numeric_dtype(series) or pd.api.types.is_datetime64_any_dtype(series):
            continue  # numbers (negative ones included) and timestamps cannot carry a formula
        out[column] = series.map(safe_cell)
    out.columns = [safe_cell(str(name)) for name in out.columns]
    return out


def write_csv(frame: pd.DataFrame, target: str | Path | IO[str]) -> None:
    """`frame` as CSV (no index) to a path or an open text stream."""
    safe_frame(frame).to_csv(target, index=False)


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """`frame` as UTF-8 CSV bytes (no index), for a download button."""
    return safe_frame(frame).to_csv(index=False).encode("utf-8")
