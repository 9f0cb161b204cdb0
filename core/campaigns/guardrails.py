"""Guardrails a follow-up must pass besides its campaign's own rules: pure (no I/O, no clock).

- Frequency cap: at most `cap` follow-ups per user (one business number, one user) in a rolling `window`, across
  every campaign. Counted: follow-ups queued in the window (`status == "queued"`) whose outbox row did not fail;
  skipped and cancelled follow-ups never reached the user and do not count.
- Local quiet hours: a campaign's `--quiet` hours are read in the user's own time. The zone comes from the phone
  number's country (`phonenumbers`): a number whose prefix maps to one zone gets it; a country with several zones
  gets its most populous one from PREFERRED_ZONES, else the first in alphabetical order (deterministic). The
  campaign's `timezone` is only the fallback, for a number the library gives no zone for (unknown or test ids).
- Marketing opt-out: a user who stopped marketing messages (131050 on a send, or the `user_preferences` webhook)
  gets no campaign template. A free-text follow-up inside the 24 h window is a service message, not a marketing
  template, and may still go.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache

import phonenumbers
from phonenumbers import timezone as phone_timezones

MARKETING_OPTED_OUT = "user stopped marketing messages"
UNKNOWN_ZONE = "Etc/Unknown"

# Countries whose numbers map to several zones: the zone most of their people live in.
PREFERRED_ZONES = {
    "AR": "America/Argentina/Buenos_Aires", "AU": "Australia/Sydney", "BR": "America/Sao_Paulo",
    "CA": "America/Toronto", "CL": "America/Santiago", "CN": "Asia/Shanghai", "EC": "America/Guayaquil",
    "ES": "Europe/Madrid", "ID": "Asia/Jakarta", "KZ": "Asia/Almaty", "MX": "America/Mexico_City",
    "PT": "Europe/Lisbon", "RU": "Europe/Moscow", "US": "America/New_York",
}


@dataclass(frozen=True)
class UserGuard:
    """What the guardrails need to know about one user, read by the caller once per batch of sessions."""

    recent_followups: int = 0  # follow-ups counted by the frequency cap in the window ending now
    marketing_opted_out: bool = False
    cap: int = 3
    cap_window: timedelta = timedelta(days=7)


NO_GUARD = UserGuard()


@lru_cache(maxsize=65_536)
def user_timezone(user_id: str, fallback: str) -> str:
    """The IANA zone of the user's phone number (wa_id: digits with the country code), or `fallback`."""
    try:
        number = phonenumbers.parse("+" + user_id.lstrip("+"))
    except phonenumbers.NumberParseException:
        return fallback
    zones = sorted(z for z in phone_timezones.time_zones_for_number(number) if z != UNKNOWN_ZONE)
    if not zones:
        return fallback
    if len(zones) == 1:
        return zones[0]
    preferred = PREFERRED_ZONES.get(phonenumbers.region_code_for_number(number) or "")
    return preferred if preferred in zones else zones[0]


def cap_reason(guard: UserGuard) -> str | None:
    """Why the frequency cap stops one more follow-up now, or None."""
    if guard.recent_followups < guard.cap:
        return None
    plural = "" if guard.cap == 1 else "s"
    return f"frequency cap: {guard.cap} follow-up{plural} in {describe(guard.cap_window)}"


def describe(window: timedelta) -> str:
    seconds = int(window.total_seconds())
    for unit, size in (("day", 86_400), ("hour", 3_600), ("minute", 60)):
        if seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}" + ("s" if count != 1 else "")
    return f"{seconds} seconds"
