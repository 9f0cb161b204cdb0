"""Overview: sessions by status, completion rate, activity over time, webhook health at a glance."""

from datetime import timedelta

import streamlit as st

from core.analytics import Filters
from dashboard import charts, common, data

st.title("Overview")
if common.no_traffic():
    st.stop()

url, now = data.url(), data.now()
filters = common.filter_bar("overview", language=False, default_days=14)

counts = data.session_counts(url, Filters(flow=filters.flow, phone_number_id=filters.phone_number_id))
row = {k: counts.loc[0, k] for k in counts.columns}  # per column: a row Series would turn counts into floats
cols = st.columns(5)
cols[0].metric("Active sessions", f"{int(row['active']):,}")
cols[1].metric("Completed", f"{int(row['completed']):,}")
cols[2].metric("Archived", f"{int(row['archived']):,}")
cols[3].metric("All sessions", f"{int(row['total']):,}")
cols[4].metric("Completion rate", f"{row['completion_rate']:.1f} %", help="Finished the flow (also if archived "
               "afterwards) / all sessions")

left, right = st.columns(2)
with left:
    over_time = data.sessions_over_time(url, filters, "day")
    if over_time.empty:
        st.info("No sessions started or completed in this range.")
    else:
        st.plotly_chart(charts.sessions_over_time(over_time), key="overview_sessions_chart")
with right:
    hourly = data.messages_per_hour(url, max(filters.since, filters.until - timedelta(days=7)), filters.until)
    if hourly.empty:
        st.info("No inbound messages in the last 7 days of this range.")
    else:
        st.plotly_chart(charts.messages_per_hour(hourly), key="overview_messages_chart")

st.subheader("Webhook health, last 24 h")
totals = data.webhook_totals(url, now - timedelta(hours=24), None)
pending = int(data.pending_queue(url, now).loc[0, "pending"])
threshold = data.settings().pending_warning_threshold
health = st.columns(4)
by_result = dict(zip(totals["result"], totals["count"], strict=True))
rejected = sum(v for k, v in by_result.items() if k.startswith("rejected"))
health[0].metric("Accepted", f"{by_result.get('accepted', 0):,}")
health[1].metric("Duplicates", f"{by_result.get('duplicate', 0):,}")
health[2].metric("Rejected", f"{rejected:,}")
health[3].metric("Pending messages", f"{pending:,}")
if pending > threshold:
    st.warning(f"{pending:,} messages wait to be applied (warning above {threshold:,}); see Health.")
