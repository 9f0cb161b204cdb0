"""Operations (admins only): act on one user's session, settle uncertain sends, retry or drop quarantined messages.

Every action goes through core.operator (as the CLI and the admin API do), needs a reason, and is written to the
audit log as `dashboard:<user>`.
"""

from collections.abc import Callable
from typing import Any

import pandas as pd
import streamlit as st

from core.errors import WaflowError
from dashboard import common, data

st.title("Operations")
if not common.is_admin():
    st.info("Only admins can act on sessions, uncertain sends and quarantined messages.")
    st.stop()

FLASH = "operations_flash"
if FLASH in st.session_state:
    st.success(st.session_state.pop(FLASH))
ACTOR = f"dashboard:{common.user()['name']}"
DEFAULT_STEP = "(where they were handed off from)"


def _act(action: Callable[[], str]) -> None:
    """Run an action; its refusal stays on the page, its summary is shown after a rerun (tables updated)."""
    try:
        message = action()
    except WaflowError as e:
        st.error(str(e))
        return
    st.session_state[FLASH] = message
    st.rerun()


def _session_actions(view: dict[str, Any]) -> None:
    phone, user = view["phone_number_id"], view["user_id"]
    steps = data.steps_of(view["flow"], view["flow_version"])
    opt_label = "Opt in again" if view["opted_out"] else "Opt out"
    with st.form("ops_session_form"):
        action = st.radio("Action", ["Reset", "Move to step", opt_label, "End hand-off"], key="ops_action",
                          horizontal=True)
        step = st.selectbox("Step (move to, or end the hand-off into)", [DEFAULT_STEP, *steps], key="ops_step")
        reason = st.text_input("Reason (mandatory, written to the audit log)", key="ops_reason")
        submitted = st.form_submit_button("Apply to this session")
    if not submitted:
        return
    picked = None if step == DEFAULT_STEP else step
    if action == "Reset":
        _act(lambda: data.reset_session(phone, user, actor=ACTOR, reason=reason))
    elif action == "Move to step":
        _act(lambda: data.move_session(phone, user, picked or "", actor=ACTOR, reason=reason))
    elif action == "End hand-off":
        _act(lambda: data.end_handoff(phone, user, picked, actor=ACTOR, reason=reason))
    else:
        _act(lambda: data.set_opt_out(phone, user, not view["opted_out"], actor=ACTOR, reason=reason))


def _session_section() -> None:
    st.subheader("A user's session")
    cols = st.columns(2)
    phone = cols[0].text_input("Business number (phone number id)", key="ops_phone").strip()
    user = cols[1].text_input("User (WhatsApp id)", key="ops_user").strip()
    if not (phone and user):
        st.caption("Enter a business number and a user to see their session and act on it.")
        return
    view = data.session_detail(phone, user)
    if view is None:
        st.warning(f"No session for {phone}/{user}.")
        return
    st.markdown(
        f"**{view['flow']}** v{view['flow_version']}, step **{view['step']}**, {view['status']}; "
        f"failures {view['failure_count']}; {'opted out' if view['opted_out'] else 'subscribed'}."
    )
    st.json(view["data"], expanded=False)
    actions = pd.DataFrame(view["operator_actions"], columns=["at", "actor", "action", "target", "reason"])
    if actions.empty:
        st.caption("No operator actions on this session yet.")
    else:
        common.table(actions, hide_index=True, key="ops_audit_table")
    _session_actions(view)


def _uncertain_section() -> None:
    st.subheader("Uncertain sends")
    st.caption("The answer to these sends was lost: WhatsApp may or may not have delivered them. A status webhook "
               "settles them by itself; otherwise check with the user and mark them here. They are never resent.")
    uncertain = data.uncertain_sends()
    if uncertain.empty:
        st.caption("No uncertain sends.")
        return
    common.table(uncertain, hide_index=True, key="ops_uncertain_table")
    with st.form("ops_resolve_form"):
        cols = st.columns(3)
        outbox_id = cols[0].selectbox("Outbound message id", uncertain["id"].tolist(), key="ops_resolve_id")
        status = cols[1].radio("Mark as", ["sent", "failed"], key="ops_resolve_status", horizontal=True)
        wamid = cols[2].text_input("wamid (optional, with sent)", key="ops_resolve_wamid").strip() or None
        reason = st.text_input("Reason (mandatory)", key="ops_resolve_reason")
        submitted = st.form_submit_button("Resolve")
    if submitted:
        _act(lambda: data.resolve_send(int(outbox_id), status, wamid, actor=ACTOR, reason=reason))


def _quarantine_section() -> None:
    st.subheader("Quarantined messages")
    held = data.quarantined_messages("held")
    if held.empty:
        st.caption("Nothing held in quarantine.")
        return
    common.table(held, hide_index=True, key="ops_quarantine_table")
    with st.form("ops_quarantine_form"):
        ids = st.multiselect("Messages", held["id"].tolist(), key="ops_quarantine_ids")
        reason = st.text_input("Reason (mandatory)", key="ops_quarantine_reason")
        cols = st.columns(2)
        retry = cols[0].form_submit_button("Retry")
        drop = cols[1].form_submit_button("Drop")
    if retry:
        _act(lambda: data.retry_quarantined([int(i) for i in ids], actor=ACTOR, reason=reason).summary)
    elif drop:
        _act(lambda: data.drop_quarantined([int(i) for i in ids], actor=ACTOR, reason=reason))


_session_section()
_uncertain_section()
_quarantine_section()
