"""States: where users in progress are in each flow (active and archived), and how long they have been there."""

import streamlit as st

from dashboard import charts, common, data

st.title("States")
st.caption("Users still in their flow, by their current step. Archived users (silent longer than the archive "
           "cutoff) still stand in their step. The date range selects users by their last message.")
if common.no_traffic():
    st.stop()

url = data.url()
filters = common.filter_bar("states")
frame = data.state_distribution(url, data.now(), filters)
if frame.empty:
    st.info("No users in progress match these filters.")
    st.stop()

cols = st.columns(3)
cols[0].metric("Users in progress", f"{int(frame['users'].sum()):,}")
cols[1].metric("Active", f"{int(frame['active'].sum()):,}", help="Wrote within the archive cutoff.")
cols[2].metric("Archived", f"{int(frame['archived'].sum()):,}",
               help="Silent longer than the archive cutoff; still in their step and resumed when they write.")
st.plotly_chart(charts.states(frame), key="states_chart")
st.plotly_chart(charts.time_in_step(frame), key="states_time_chart")
st.dataframe(
    frame,
    hide_index=True,
    key="states_table",
    column_config={
        "p50_hours_in_step": st.column_config.NumberColumn("median hours in step", format="%.2f"),
        "p90_hours_in_step": st.column_config.NumberColumn("p90 hours in step", format="%.2f"),
    },
)
