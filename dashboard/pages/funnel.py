"""Funnel: per flow, how many users reach each step, where they drop off, and who dropped where."""

import streamlit as st

from dashboard import charts, common, data

WINDOWS = {"No limit": None, "1 hour": 3600, "24 hours": 86400, "7 days": 7 * 86400, "30 days": 30 * 86400}

st.title("Funnel")
st.caption("Cohort: users who first entered the flow in the date range. A step counts when reached within the "
           "conversion window after entering. Same numbers as `python -m core funnel`.")
if common.no_traffic():
    st.stop()

url = data.url()
filters = common.filter_bar("funnel", flow_required=True, default_days=7)
window_label = st.selectbox("Conversion window", list(WINDOWS), key="funnel_window")
window = WINDOWS[window_label]
flow_name = filters.flow or ""
table = data.funnel(url, flow_name, filters, window, None)
if table.empty:
    st.info("Nobody entered this flow in the selected range. Widen the date range or clear a filter.")
    st.stop()

table = table.drop(columns=["segment"])
cohort = int(table["reached"].iloc[0])
completed = int(table["reached"].iloc[-1])
cols = st.columns(3)
cols[0].metric("Entered", f"{cohort:,}")
cols[1].metric("Reached the end", f"{completed:,}")
cols[2].metric("Conversion", f"{100.0 * completed / cohort:.1f} %" if cohort else "–")

left, right = st.columns([3, 2])
with left:
    st.plotly_chart(charts.funnel(table), key="funnel_chart")
with right:
    st.dataframe(
        table.assign(median_to_next=table["median_seconds_to_next"].map(common.seconds_label)).drop(
            columns=["median_seconds_to_next"]
        ),
        hide_index=True,
        key="funnel_table",
    )

st.subheader("Breakdown")
by_label = st.radio("Break down by", ["Language", "Business number"], horizontal=True, key="funnel_by")
by = "language" if by_label == "Language" else "phone_number_id"
breakdown = data.funnel(url, flow_name, filters, window, by)
st.plotly_chart(charts.funnel_breakdown(breakdown, by), key="funnel_breakdown_chart")
st.dataframe(breakdown, hide_index=True, key="funnel_breakdown_table")

st.subheader("Time to complete")
durations = data.time_to_complete(url, flow_name, filters, window)
if durations.empty:
    st.info("Nobody in this cohort completed the flow yet.")
else:
    st.plotly_chart(charts.time_to_complete(durations), key="funnel_ttc_chart")
    st.caption(f"Median {common.seconds_label(durations['seconds'].median())} over the {len(durations):,} most "
               "recent users who completed (at most 20,000).")

st.subheader("Who dropped off")
steps = table["step"].tolist()[:-1]
step = st.selectbox("Users who reached this step but not the next", steps, key="funnel_drop_step")
dropped = data.dropped_users(url, flow_name, step, filters, window)
st.caption(f"{len(dropped):,} user(s) dropped at {step} (newest first, at most 5,000).")
common.table(common.masked(dropped), hide_index=True, key="funnel_dropped_table")
