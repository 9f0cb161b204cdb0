"""Demo traffic: a week of realistic WhatsApp users of the shipped flows, as Meta webhook payloads.

Pure: a seed, an end time and the flows in, a `Scenario` out (no network, no clock, no database). The same
seed and end time always give the same bytes. `python -m core simulate` (core/commands/simulate.py) plays it
against the real webhook over HTTP.

Each user is walked through their flow with `core.machine.decide`, so the script always knows which question
the bot is asking and answers it the way people do: typing delays, about a third giving up mid-flow (some
coming back days later), typos that earn a reprompt, double-sent answers and double taps, taps on old
buttons, photos and voice notes where text was expected, unsupported messages, STOP, Spanish speakers.
Delivery adds what Meta does: duplicate deliveries (same wamid, other bytes), messages of several users in
one POST, and a user's burst delivered in reverse order. Message timestamps are backdated so a week of
traffic ends at `end`.

Two things depend on the running system and are left to the player: `context.id` (a reply names the
outbound wamid of the prompt it answers, known only once the sender has sent it: `SimMessage.context_text`
says which prompt), and whether a returning user's session has been archived (`Post.gate`).
"""

from core.simulation.conversation import to_inbound
from core.simulation.model import DAY, DEFAULT_ROUTES, HOUR, Post, Scenario, SimConfig, SimMessage, UserPlan
from core.simulation.population import generate
from core.simulation.wire import plan_statuses, status_body, webhook_body

__all__ = [
    "DAY", "DEFAULT_ROUTES", "HOUR", "Post", "Scenario", "SimConfig", "SimMessage", "UserPlan", "generate",
    "plan_statuses", "status_body", "to_inbound", "webhook_body",
]
