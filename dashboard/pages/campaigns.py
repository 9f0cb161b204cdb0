"""Campaigns: create, edit, pause follow-up campaigns; preview who they target; results as charts."""

from typing import Any

import streamlit as st

from core import campaigns
from core.errors import WaflowError
from dashboard import charts, common, data

st.title("Campaigns")
st.caption("Follow-ups to users stalled in a step. The jobs process (`python -m jobs`) sends them.")
common.no_traffic()  # explains how to get traffic; campaigns can still be prepared without it

url, now = data.url(), data.now()
FLASH = "campaigns_flash"
if FLASH in st.session_state:
    st.success(st.session_state.pop(FLASH))


def _done(message: str) -> None:
    """Show `message` after a rerun, so every table above the form already includes the change."""
    data.clear()
    st.session_state[FLASH] = message
    st.rerun()


COST_LABELS = {"category": "Pricing category", "messages": "Messages", "billable": "Billable"}
PLACEHOLDER_HELP = (
    "{key} is filled from the data the flow collected, or {profile_name} (WhatsApp profile name); "
    "{key|fallback} uses the fallback when the user has no value. Users without a value for a placeholder "
    "without fallback are skipped."
)


def _form_fields(prefix: str, current: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The campaign fields as a dict for build_spec, or None after showing what is wrong."""
    c = current or {}
    flow_names = data.registry().names()
    flow = st.selectbox("Flow", flow_names, key=f"{prefix}_flow",
                        index=flow_names.index(c["flow"]) if c.get("flow") in flow_names else 0)
    steps = list(data.flow(flow).steps)
    step = st.selectbox("Step", steps, key=f"{prefix}_step",
                        index=steps.index(c["step"]) if c.get("step") in steps else 0)
    delay = st.text_input("Send after idle for", value=_duration(c.get("delay_seconds"), "2h"), key=f"{prefix}_delay")
    text = st.text_area("Free-text message (inside the 24 h window)", value=c.get("text") or "", key=f"{prefix}_text",
                        help=PLACEHOLDER_HELP)
    cols = st.columns(3)
    template = cols[0].text_input("Template name", value=c.get("template_name") or "", key=f"{prefix}_tpl")
    language = cols[1].text_input("Template language", value=c.get("template_language") or "", key=f"{prefix}_tl")
    params = cols[2].text_input("Template parameters (comma-separated, {data_key} or literal)",
                                value=",".join(c.get("template_params") or []), key=f"{prefix}_tp",
                                help=PLACEHOLDER_HELP)
    cols = st.columns(4)
    max_sends = cols[0].number_input("Max sends", 1, 10, int(c.get("max_sends") or 1), key=f"{prefix}_max")
    quiet_start = cols[1].text_input("Quiet from (HH:MM)", value=c.get("quiet_start") or "", key=f"{prefix}_qs")
    quiet_end = cols[2].text_input("Quiet until (HH:MM)", value=c.get("quiet_end") or "", key=f"{prefix}_qe")
    timezone = cols[3].text_input("Timezone", value=c.get("timezone") or "UTC", key=f"{prefix}_tz")
    cols = st.columns(3)
    filter_language = cols[0].text_input("Only language", value=c.get("filter_language") or "", key=f"{prefix}_fl")
    filter_number = cols[1].text_input("Only business number", value=c.get("filter_phone_number_id") or "",
                                       key=f"{prefix}_fn")
    recovery = cols[2].text_input("Recovered if advancing within",
                                  value=_duration(c.get("recovery_window_seconds"), "48h"), key=f"{prefix}_rw")
    try:
        delay_seconds, recovery_seconds = campaigns.parse_duration(delay), campaigns.parse_duration(recovery)
    except ValueError as e:
        st.error(str(e))
        return None
    return {
        "flow": flow, "step": step, "delay_seconds": delay_seconds, "text": text or None,
        "template_name": template or None, "template_language": language or None,
        "template_params": [p.strip() for p in params.split(",") if p.strip()], "max_sends": int(max_sends),
        "quiet_start": quiet_start or None, "quiet_end": quiet_end or None, "timezone": timezone or "UTC",
        "filter_language": filter_language or None, "filter_phone_number_id": filter_number or None,
        "recovery_window_seconds": recovery_seconds,
    }


def _duration(seconds: int | None, default: str) -> str:
    if not seconds:
        return default
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


listing = data.campaign_list(url)
if listing.empty:
    st.info("No campaigns yet." + (" Create one below, or from a selection on the Stalled users page."
                                  if common.is_admin() else " An admin can create one."))
else:
    results = data.campaign_results(url, now)
    st.plotly_chart(charts.campaign_results(results), key="campaigns_results_chart")
    common.table(results, hide_index=True, key="campaigns_results_table")
    common.table(listing, hide_index=True, key="campaigns_table")

    names = dict(zip(listing["name"], listing["id"], strict=True))
    picked = st.selectbox("Campaign", list(names), key="campaigns_pick")
    campaign_id = int(names[picked])
    current = listing[listing["id"] == campaign_id].iloc[0].to_dict()
    st.markdown(f"**{picked}** is {'active' if current['active'] else 'paused'}.")
    if common.is_admin():
        label = "Pause" if current["active"] else "Resume"
        if st.button(f"{label} {picked}", key="campaigns_toggle"):
            campaigns.set_active(data.db(), campaign_id, not current["active"])
            _done(f"{picked} {'paused' if current['active'] else 'resumed'}.")

    failures = data.campaign_failures(url, campaign_id)
    if failures.empty:
        st.caption("No failed sends for this campaign.")
    else:
        st.plotly_chart(charts.failures_by_code(failures, f"{picked}: failures by error code"),
                        key="campaigns_failures_chart")

    st.subheader("Cost")
    costs = data.campaign_costs(url, campaign_id)
    if costs.empty:
        st.caption("Meta has reported no pricing for this campaign's messages yet.")
    else:
        st.caption("Follow-ups by the pricing category Meta reported with their delivery statuses.")
        common.table(costs.rename(columns=COST_LABELS), hide_index=True, key="campaigns_cost_table")

    st.subheader("Who it would target now, and when")
    preview = data.campaign_preview(url, campaign_id, now)
    st.caption(f"{len(preview):,} session(s) stalled in {current['flow']}/{current['step']}.")
    if not preview.empty:
        st.markdown(f"**Cost estimate:** {campaigns.preview_cost(preview).describe()}.")
    common.table(common.masked(preview), hide_index=True, key="campaigns_preview_table")

    if common.is_admin():
        with st.expander(f"Edit {picked}"), st.form("campaigns_edit"):
            # Keys per campaign: switching campaigns must not carry the previous one's edits over.
            fields = _form_fields(f"edit{campaign_id}", current)
            new_name = st.text_input("Name", value=picked, key=f"edit{campaign_id}_name")
            save = st.form_submit_button("Save changes")
        if save and fields is not None:
            try:
                campaigns.update_campaign(data.db(), campaign_id, data.registry(), name=new_name, **fields)
            except WaflowError as e:
                st.error(str(e))
            else:
                _done(f"Saved {new_name!r}.")

st.subheader("New campaign")
if not common.is_admin():
    st.info("Only admins can create or change campaigns.")
else:
    with st.form("campaigns_new"):
        name = st.text_input("Name", key="new_name")
        fields = _form_fields("new")
        create = st.form_submit_button("Create campaign")
    if create and fields is not None:
        try:
            created = campaigns.create_campaign(data.db(), campaigns.build_spec(name=name, **fields), data.registry())
        except WaflowError as e:
            st.error(str(e))
        else:
            _done(f"Created {created.name!r}.")
