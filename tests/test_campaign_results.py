"""Campaign results are counted in SQL: on both backends they equal a hand count of a small fixture.

Rows are written directly (campaigns, follow-ups, outbox, delivery statuses, transitions) so every edge is
exact. T has a .9997 s fraction: a window deadline that rounded to milliseconds would land a second late.

Campaign "email" (lead_qualification/ask_email, recovered within 1 h), now = T + 5000 s:
  P1/a  attempt 1 at T: sent, read; advanced out of ask_email at exactly T + 3600 s   → replied, recovered
  P1/a  attempt 2 at T + 4000 s: sent, delivered; nothing after it                   → (a is one session)
  P1/b  sent, delivery failed; advanced out of ask_email 1 µs after the window        → replied
  P1/c  send failed; a reprompt (still in ask_email) at T + 60 s                      → replied
  P1/d  skipped; advanced at T + 10 s                                                 → skipped only
  P1/e  still queued; advanced out of another step at T + 30 s, wrote at T - 10 s     → replied
  P1/f  sent; advanced out of ask_email at T + 6000 s, after now                      → nothing
  P2/a  sent (same user id, other business number: its own session, none of P1/a's transitions)
Campaign "date" (service_booking/choose_date, 2 h): P1/h sent, delivered, advanced out of choose_date at
T + 4000 s (replied, recovered); P1/a not sent yet (replied: P1/a wrote after T; not recovered: other step).
Campaign "idle": no follow-ups.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import count
from typing import Any

import pytest
from sqlalchemy import insert, select, update

from core import campaigns as api
from core.db import Database
from core.models import Campaign, ChatSession, FollowUp, MessageStatus, Outbox, Transition

T = datetime(2026, 3, 2, 9, 0, 0, 999700, tzinfo=UTC)
NOW = T + timedelta(seconds=5000)
COUNTS = ["targeted", "sent", "delivered", "read", "failed", "replied", "recovered", "skipped"]


def at(seconds: float, microseconds: int = 0) -> datetime:
    return T + timedelta(seconds=seconds, microseconds=microseconds)


class Fixture:
    """With `sessions`, every transition also keeps its session's last_inbound_at, as the engine does; without,
    the follow-ups' users have no session row (moved to a new number), so results must read the log alone."""

    def __init__(self, db: Database, *, sessions: bool = True) -> None:
        self.db = db
        self.ids = count(1)
        self.sessions = sessions

    def campaign(self, name: str, flow: str, step: str, window: int) -> int:
        with self.db.begin() as conn:
            return int(conn.execute(insert(Campaign).values(
                name=name, flow=flow, step=step, delay_seconds=3600, text="Still there?", template_params=[],
                recovery_window_seconds=window,
            )).inserted_primary_key[0])

    def followup(self, campaign_id: int, user: str, *, phone: str = "P1", attempt: int = 1, created: float = 0,
                 step: str = "ask_email", status: str = "queued", send: str | None = None,
                 delivery: str | None = None) -> None:
        """A follow-up; `send` gives it an outbox row with that status, `delivery` a delivery status too."""
        n = next(self.ids)
        with self.db.begin() as conn:
            outbox_id = None
            if send is not None:
                wamid = f"out.{n}" if send == "sent" else None
                outbox_id = conn.execute(insert(Outbox).values(
                    idempotency_key=f"followup:{n}", phone_number_id=phone, user_id=user, kind="text", body={},
                    campaign_id=campaign_id,
                    status=send, wamid=wamid, error_code=131026 if send == "failed" else None, created_at=at(created),
                )).inserted_primary_key[0]
                if delivery is not None:
                    conn.execute(insert(MessageStatus).values(
                        wamid=wamid, phone_number_id=phone, recipient_id=user, status=delivery, rank=1,
                        status_at=at(created + 5),
                    ))
            conn.execute(insert(FollowUp).values(
                campaign_id=campaign_id, phone_number_id=phone, user_id=user, attempt=attempt, step=step,
                status=status, outbox_id=outbox_id, stalled_since=at(created - 7200), created_at=at(created),
            ))

    def transition(self, user: str, when: datetime, from_step: str, to_step: str, *, phone: str = "P1",
                   outcome: str = "advanced", flow: str = "lead_qualification") -> None:
        n = next(self.ids)
        with self.db.begin() as conn:
            conn.execute(insert(Transition).values(
                phone_number_id=phone, user_id=user, flow=flow, flow_version=1, from_step=from_step, to_step=to_step,
                outcome=outcome, wamid=f"in.{n}", at=when, applied_at=when, elapsed_seconds=1.0, session_version=n,
                language="en",
            ))
            if not self.sessions:
                return
            last = conn.scalar(select(ChatSession.last_inbound_at).where(
                ChatSession.phone_number_id == phone, ChatSession.user_id == user))
            if last is None:
                conn.execute(insert(ChatSession).values(
                    phone_number_id=phone, user_id=user, flow=flow, flow_version=1, current_step=to_step, data={},
                    version=1, failure_count=0, language="en", status="active", last_inbound_at=when,
                ))
            elif when > last:
                conn.execute(update(ChatSession).where(
                    ChatSession.phone_number_id == phone, ChatSession.user_id == user).values(last_inbound_at=when))


def counts(frame: Any, campaign: str) -> dict[str, int]:
    row = frame.set_index("campaign").loc[campaign]
    return {name: int(row[name]) for name in COUNTS}


@pytest.mark.parametrize("sessions", [True, False], ids=["with-sessions", "moved-sessions"])
def test_results_equal_a_hand_count(db: Database, sessions: bool) -> None:
    f = Fixture(db, sessions=sessions)
    email = f.campaign("email", "lead_qualification", "ask_email", 3600)
    date = f.campaign("date", "service_booking", "choose_date", 7200)
    f.campaign("idle", "lead_qualification", "ask_city", 3600)

    f.followup(email, "a", send="sent", delivery="read")
    f.transition("a", at(3600), "ask_email", "ask_city")
    f.followup(email, "a", attempt=2, created=4000, send="sent", delivery="delivered")
    f.followup(email, "b", send="sent", delivery="failed")
    f.transition("b", at(3600, 1), "ask_email", "ask_city")
    f.followup(email, "c", send="failed")
    f.transition("c", at(60), "ask_email", "ask_email", outcome="reprompted")
    f.followup(email, "d", status="skipped")
    f.transition("d", at(10), "ask_email", "ask_city")
    f.followup(email, "e", send="queued")
    f.transition("e", at(-10), None, "ask_name", outcome="started")  # type: ignore[arg-type]
    f.transition("e", at(30), "ask_name", "ask_email")
    f.followup(email, "f", send="sent")
    f.transition("f", at(6000), "ask_email", "ask_city")
    f.followup(email, "a", phone="P2", send="sent")

    f.followup(date, "h", step="choose_date", send="sent", delivery="delivered")
    f.transition("h", at(4000), "choose_date", "choose_time", flow="service_booking")
    f.followup(date, "a", step="choose_date")

    results = api.campaign_results(db, None, NOW)
    assert list(results.columns) == api.RESULT_COLUMNS
    assert results["campaign"].tolist() == ["email", "date", "idle"]
    assert counts(results, "email") == {
        "targeted": 7, "sent": 5, "delivered": 2, "read": 1, "failed": 2, "replied": 4, "recovered": 1, "skipped": 1,
    }
    assert counts(results, "date") == {
        "targeted": 2, "sent": 1, "delivered": 1, "read": 0, "failed": 0, "replied": 2, "recovered": 1, "skipped": 0,
    }
    assert counts(results, "idle") == dict.fromkeys(COUNTS, 0)
    # One campaign, by id or by name; an earlier `now` sees fewer replies.
    assert counts(api.campaign_results(db, date, NOW), "date")["recovered"] == 1
    earlier = api.campaign_results(db, "email", at(90))
    assert (counts(earlier, "email")["replied"], counts(earlier, "email")["recovered"]) == (2, 0)  # c and e


def test_results_without_campaigns_are_empty(db: Database) -> None:
    assert api.campaign_results(db, None, NOW).empty
    assert list(api.campaign_results(db, None, NOW).columns) == api.RESULT_COLUMNS
