"""Settings from environment variables: one `Settings` model, read the same way by every process."""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

DEFAULT_DATABASE_URL = "sqlite:///./data/waflow.db"
DEFAULT_GRAPH_API_URL = "https://graph.facebook.com/v23.0"
# Upper bounds of numeric settings: a duration beyond ten years is a typo, and would overflow datetime arithmetic.
TEN_YEARS_SECONDS = 10 * 365 * 86400
_DURATION_UNITS = {"_seconds": 1.0, "_hours": 3600.0, "_ms": 0.001}
MAX_COUNT = 2**31 - 1  # what a database INTEGER and the C libraries below us take


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    database_url: str = DEFAULT_DATABASE_URL
    # Comma-separated: several secrets are accepted while an app secret is being rotated.
    whatsapp_app_secret: str = ""
    whatsapp_verify_token: str = ""
    whatsapp_access_token: str = ""
    graph_api_url: str = DEFAULT_GRAPH_API_URL
    send_mode: Literal["dry-run", "live"] = "dry-run"
    admin_token: str = ""

    # Flows: where flow files live, which flow a new user of each business number starts.
    flows_dir: Path | None = None
    default_flow: str = "lead_qualification"
    # "PHONE_NUMBER_ID=flow,PHONE_NUMBER_ID=flow"
    flow_routes: str = ""
    # The language a new session starts in, by the user's number: "34=es,52=es,55=pt" (longest prefix wins).
    # Unmapped numbers, business-scoped ids and languages a flow lacks get the flow's default language.
    language_by_prefix: str = ""

    # Engine
    apply_batch_limit: int = 100
    # A message that fails to apply (a flow replaced without its old step, a bug, a value the database refuses) is
    # tried this many times, then quarantined: it never holds the user's later messages longer than that.
    apply_max_attempts: int = 3
    # The webhook's apply thread waits this long after a user's first newly stored message, so a burst Meta
    # delivers out of order is applied in WhatsApp timestamp order (0: apply at once). Not the sweeper.
    apply_reorder_wait_ms: int = 200
    db_pool_size: int = 10
    db_max_overflow: int = 20

    # Jobs
    archive_after_hours: float = 24.0
    archive_batch_size: int = 1000
    archive_interval_seconds: float = 300.0
    followups_interval_seconds: float = 60.0
    sender_interval_seconds: float = 2.0
    sweeper_interval_seconds: float = 30.0
    # The funnel rollup (analytics_step_reach); funnel queries also refresh it before reading.
    rollups_interval_seconds: float = 60.0
    send_rate_per_second: float = 80.0
    send_user_spacing_seconds: float = 1.0
    send_timeout_seconds: float = 10.0
    send_max_attempts: int = 8
    quiet_hours_timezone: str = "UTC"
    recovery_window_hours: float = 48.0
    # Frequency cap across all campaigns (core.campaigns.guardrails): at most FOLLOWUP_CAP follow-ups to a user in
    # a rolling FOLLOWUP_CAP_WINDOW (a duration: 90s, 30m, 2h, 7d).
    followup_cap: int = 3
    followup_cap_window: str = "7d"
    # Jobs: outbox sender (see jobs/sender.py for the retry classes and the at-least-once window)
    send_workers: int = 8
    send_batch_size: int = 500
    send_connect_timeout_seconds: float = 3.05
    send_backoff_base_seconds: float = 2.0
    send_backoff_max_seconds: float = 900.0
    # 131056: Meta allows about one message every 6 s from one business number to one user.
    send_recipient_retry_seconds: float = 6.0
    # 131049 (per-user marketing limit): retried after 1 h, 4 h, 16 h, ... capped at a day.
    send_slow_retry_seconds: float = 3600.0
    # A "sending" claim older than this is freed by the sweeper (queued again, or uncertain if sent).
    send_claim_timeout_seconds: float = 300.0
    # Jobs: sweeper, follow-ups, singleton runs
    sweeper_pending_age_seconds: float = 30.0
    followups_batch_size: int = 200
    # PostgreSQL: archive batches run on this many connections at once (they split the work via SKIP LOCKED).
    archive_workers: int = 2
    # SQLite only (PostgreSQL uses advisory locks): an unfinished run older than this no longer blocks.
    job_lease_seconds: float = 900.0

    # Webhook server: threads applying stored messages, and how often the in-process sweeper runs.
    apply_threads: int = 1
    # `python -m jobs` serves Prometheus metrics (sender results, errors, latency, job runs) on this port; 0: off.
    jobs_metrics_port: int = 0
    jobs_metrics_host: str = "127.0.0.1"
    pending_sweep_interval_seconds: float = 5.0

    # Dashboard sign-in. DASHBOARD_USERS: "name:role:pbkdf2_sha256$iterations$salt$hash,..." (role admin|viewer);
    # `python -m core hash-password` prints the hash.
    dashboard_users: str = ""
    demo_mode: bool = False
    pending_warning_threshold: int = 100

    @field_validator("database_url")
    @classmethod
    def _normalize_database_url(cls, value: str) -> str:
        # Heroku-style URLs and plain "postgresql://" would select psycopg2, which we do not ship.
        for prefix in ("postgres://", "postgresql://"):
            if value.startswith(prefix):
                value = "postgresql+psycopg://" + value[len(prefix) :]
        try:
            make_url(value)
        except (ArgumentError, ValueError):  # ValueError: a port that is not a number
            # The value itself is not repeated: it may hold a password.
            raise ValueError("not a database URL: use sqlite:///PATH or "
                             "postgresql+psycopg://USER:PASSWORD@HOST:5432/DATABASE") from None
        return value

    @field_validator("*")
    @classmethod
    def _number_in_range(cls, value: Any, info: ValidationInfo) -> Any:
        """No numeric setting is negative, infinite or absurdly large (durations: at most ten years)."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return value
        name = info.field_name or ""
        unit = next((seconds for suffix, seconds in _DURATION_UNITS.items() if name.endswith(suffix)), None)
        high = TEN_YEARS_SECONDS / unit if unit else 65535 if name.endswith("_port") else MAX_COUNT
        if not math.isfinite(value) or not 0 <= value <= high:
            raise ValueError(f"must be a number from 0 to {high:,.0f}")
        return value

    @field_validator("followup_cap_window")
    @classmethod
    def _duration(cls, value: str) -> str:
        from core.campaigns.spec import parse_duration  # here: core.campaigns imports this module

        parse_duration(value)
        return value

    @property
    def followup_cap_window_seconds(self) -> int:
        from core.campaigns.spec import parse_duration

        return parse_duration(self.followup_cap_window)

    @field_validator("graph_api_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @property
    def app_secrets(self) -> list[str]:
        return [s.strip() for s in self.whatsapp_app_secret.split(",") if s.strip()]

    @property
    def routes(self) -> dict[str, str]:
        return dict(_pairs(self.flow_routes))

    def language_for(self, user_id: str) -> str | None:
        prefixes = sorted(_pairs(self.language_by_prefix), key=lambda pair: -len(pair[0]))
        return next((lang for prefix, lang in prefixes if prefix and user_id.startswith(prefix)), None)

    def flow_for(self, phone_number_id: str) -> str:
        return self.routes.get(phone_number_id, self.default_flow)


def _pairs(text: str) -> list[tuple[str, str]]:
    """"a=b,c=d" settings (FLOW_ROUTES, LANGUAGE_BY_PREFIX) as stripped (key, value) pairs."""
    pairs = (item.split("=", 1) for item in text.split(",") if "=" in item)
    return [(key.strip(), value.strip()) for key, value in pairs]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
