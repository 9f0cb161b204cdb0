"""States: where active users are in each flow, and how long they have been there."""

import streamlit as st

from dashboard import charts, common, data

st.title("States")
st.caption("Active sessions by their current step. The date range selects users by their last message.")
if common.no_traffic():
    st.stop()

url = data.url()
filters = common.filter_bar("states")
frame = data.state_distribution(url, data.now(), filters)
if frame.empty:
    st.info("No active users match these filters.")
    st.stop()

st.metric("Active users", f"{int(frame['users'].sum()):,}")
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
