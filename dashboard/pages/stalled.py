"""Stalled users: idle in a step longer than X; window, follow-ups, opt-out; CSV export; start a campaign."""

import streamlit as st

from core import campaigns, csvsafe
from core.analytics import StalledQuery
from core.errors import WaflowError
from dashboard import charts, common, data

WINDOW = {"Any": "any", "Inside 24 h window": "inside", "Outside window": "outside"}
OPTED = {"Any": "any", "Subscribed only": "no", "Opted out only": "yes"}
STATUS = {"Active and archived": "any", "Active only": "active", "Archived only": "archived"}

st.title("Stalled users")
st.caption("Users still in their flow whose last message is older than the idle threshold, longest idle first. "
           "Archived users (silent past the archive cutoff) are included: they resume where they stopped.")
if common.no_traffic():
    st.stop()

url, now = data.url(), data.now()
filters = common.filter_bar("stalled", dates=False)
steps = list(data.flow(filters.flow).steps) if filters.flow else sorted(
    {s for f in data.registry() for s in f.steps}
)
cols = st.columns(6)
with cols[0]:
    step_choice = st.selectbox("Step", [common.ALL, *steps], key="stalled_step")
with cols[1]:
    idle_text = st.text_input("Idle longer than", value="2h", key="stalled_idle", help="e.g. 30m, 2h, 3d, 1h30m")
with cols[2]:
    window = WINDOW[st.selectbox("24 h window", list(WINDOW), key="stalled_window")]
with cols[3]:
    opted = OPTED[st.selectbox("Opt-out", list(OPTED), key="stalled_opted")]
with cols[4]:
    presence = STATUS[st.selectbox("Status", list(STATUS), key="stalled_status")]
with cols[5]:
    limit = int(st.number_input("Max rows", min_value=1, max_value=100_000, value=1000, step=100,
                                key="stalled_limit"))
try:
    idle_seconds = campaigns.parse_duration(idle_text)
except ValueError as e:
    st.error(str(e))
    st.stop()

step = None if step_choice == common.ALL else step_choice
query = StalledQuery(now=now, idle_seconds=idle_seconds, flow=filters.flow, step=step,
                     phone_number_id=filters.phone_number_id, language=filters.language, window=window,
                     opted_out=opted, status=presence, limit=limit)
frame = data.stalled_users(url, query)
total = data.stalled_count(url, query)
# What is shown is what the CSV holds, formula-like cells quoted (core.csvsafe): the table's own download
# button exports the shown cells as they are.
shown = csvsafe.safe_frame(common.masked(frame))
st.metric("Stalled users", f"{total:,}", help="All users matching the filters; the table and CSV hold the first "
          "'Max rows' of them.")
if frame.empty:
    st.info("Nobody is stalled with these filters.")
    st.stop()

st.plotly_chart(charts.stalled_by_step(frame), key="stalled_chart")
st.dataframe(shown, hide_index=True, key="stalled_table")
csv_bytes = csvsafe.csv_bytes(shown)
# Kept in the session too: the CSV offered is exactly the rows above (tests read it from here).
st.session_state["stalled_csv"] = csv_bytes
st.download_button(
    f"Download these {len(shown):,} rows as CSV", csv_bytes, file_name="stalled_users.csv", mime="text/csv",
    key="stalled_download",
)
if not common.is_admin():
    st.caption("Phone numbers are masked for viewers, in the table and in the CSV.")

st.subheader("Start a follow-up campaign for this selection")
if not common.is_admin():
    st.info("Only admins can create campaigns.")
elif not (filters.flow and step):
    st.info("Pick a flow and a step above: a campaign follows up users stalled in one step.")
else:
    with st.form("stalled_campaign"):
        name = st.text_input("Campaign name", value=f"{filters.flow}-{step}-{idle_text}", key="stalled_cname")
        text = st.text_area("Message (inside the 24 h window)", key="stalled_ctext",
                            value="Still there? Reply to pick up where you left off.")
        template = st.text_input("Approved template for users outside the window (optional)", key="stalled_ctpl")
        template_language = st.text_input("Template language", value="en_US", key="stalled_ctpl_lang")
        max_sends = int(st.number_input("Max sends per user", min_value=1, max_value=10, value=1,
                                        key="stalled_cmax"))
        submitted = st.form_submit_button("Create campaign")
    if submitted:
        try:
            spec = campaigns.build_spec(
                name=name, flow=filters.flow, step=step, delay_seconds=idle_seconds, text=text or None,
                template_name=template or None, template_language=template_language if template else None,
                max_sends=max_sends, filter_language=filters.language,
                filter_phone_number_id=filters.phone_number_id,
            )
            created = campaigns.create_campaign(data.db(), spec, data.registry())
        except WaflowError as e:
            st.error(str(e))
        else:
            data.clear()
            st.success(f"Campaign {created.name!r} created (id {created.id}); manage it on the Campaigns page.")
