"""Health: webhook results, pending queue, quarantine, apply latency, outbox backlog, send failures, jobs."""

from datetime import timedelta

import streamlit as st

from dashboard import charts, common, data

st.title("Health")
if common.no_traffic():
    st.stop()

url, now = data.url(), data.now()
hours = st.selectbox("Period", [1, 6, 24, 72, 168], index=2, key="health_hours", format_func=lambda h: f"last {h} h")
since = now - timedelta(hours=hours)

queue = data.pending_queue(url, now)
pending, oldest = int(queue.loc[0, "pending"]), float(queue.loc[0, "oldest_age_seconds"])
threshold = data.settings().pending_warning_threshold
overall = data.apply_latency(url, since, None, None)
applied, p99 = int(overall.loc[0, "n"]), overall.loc[0, "p99"]
totals = data.webhook_totals(url, since, None)
by_result = dict(zip(totals["result"], totals["count"], strict=True))
cols = st.columns(5)
cols[0].metric("Accepted webhooks", f"{by_result.get('accepted', 0):,}")
cols[1].metric("Duplicates", f"{by_result.get('duplicate', 0):,}")
cols[2].metric("Rejected", f"{sum(v for k, v in by_result.items() if k.startswith('rejected')):,}")
cols[3].metric("Pending messages", f"{pending:,}", help=f"Oldest waits {common.seconds_label(oldest)}")
cols[4].metric("Apply latency p99", f"{p99:.3f} s" if applied else "–", help=f"{applied:,} messages applied")
if pending > threshold:
    st.error(f"Pending queue depth {pending:,} is above the warning threshold {threshold:,} "
             "(PENDING_WARNING_THRESHOLD): are the webhook workers / sweeper running?")
else:
    st.success(f"Pending queue depth {pending:,} (warning above {threshold:,}).")

# Quarantine (read-only here): messages held for an operator instead of blocking their user or anyone else.
counts = data.quarantine_counts(url)
held = dict(zip(counts["stage"], counts["held"], strict=True))
if sum(held.values()):
    st.warning(f"Quarantine: {sum(held.values()):,} message(s) held, {held.get('apply', 0):,} that failed to apply "
               f"(APPLY_MAX_ATTEMPTS tries) and {held.get('intake', 0):,} that could not be stored. Their users' "
               "later messages went on; `python -m core quarantine retry|drop` once the cause is fixed.")
    common.table(data.quarantined_recent(url, 20), hide_index=True, key="health_quarantine_table")
else:
    st.success("Quarantine: no message held.")

for pause in data.sender_pauses(url).itertuples():
    st.error(f"Sending paused for {pause.phone_number_id} since {pause.paused_at:%Y-%m-%d %H:%M} UTC: {pause.reason}")

left, right = st.columns(2)
with left:
    results = data.webhook_results(url, since, None, "hour")
    if results.empty:
        st.info("No webhook requests recorded in this period.")
    else:
        st.plotly_chart(charts.webhook_results(results), key="health_webhooks_chart")
with right:
    trend = data.apply_latency(url, since, None, "hour")
    if trend.empty:
        st.info("No messages applied in this period.")
    else:
        st.plotly_chart(charts.apply_latency(trend), key="health_latency_chart")

left, right = st.columns(2)
with left:
    backlog = data.outbox_backlog(url, now)
    if backlog.empty:
        st.info("The outbox is empty.")
    else:
        st.plotly_chart(charts.outbox_backlog(backlog), key="health_outbox_chart")
        st.dataframe(backlog, hide_index=True, key="health_outbox_table")
with right:
    failures = data.send_failures(url, since)
    if failures.empty:
        st.success("No send failures in this period.")
    else:
        st.plotly_chart(charts.failures_by_code(failures), key="health_failures_chart")

runs = data.job_runs(url)
if not runs.empty:
    st.subheader("Jobs: last run")
    st.dataframe(runs, hide_index=True, key="health_jobs_table")
