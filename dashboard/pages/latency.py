"""Transition latency: time between consecutive steps, its distribution and trend; the slowest are friction."""

import streamlit as st

from dashboard import charts, common, data

st.title("Transition latency")
st.caption("Time from a user's previous message to the message that moved them to the next step. The three "
           "slowest step changes (by median) are flagged as friction points.")
if common.no_traffic():
    st.stop()

url = data.url()
filters = common.filter_bar("latency", default_days=7)
table = data.transition_latency(url, filters)
if table.empty:
    st.info("No step changes match these filters.")
    st.stop()

friction = table[table["friction"]]
st.warning("Friction points: " + "; ".join(
    f"{r.from_step} → {r.to_step} (median {common.seconds_label(r.p50)})" for r in friction.itertuples()
))
st.plotly_chart(charts.latency_bars(table), key="latency_bars_chart")
st.dataframe(
    table.style.apply(lambda row: ["background-color: #fde2e2" if row["friction"] else "" for _ in row], axis=1),
    hide_index=True,
    key="latency_table",
    column_config={q: st.column_config.NumberColumn(f"{q} (s)", format="%.1f") for q in ("p50", "p90", "p99")},
)

labels = ["All step changes", *(f"{r.from_step} → {r.to_step}" for r in table.itertuples())]
picked = st.selectbox("Histogram of", labels, key="latency_transition")
from_step = to_step = None
if picked != labels[0]:
    from_step, to_step = picked.split(" → ")
samples = data.latency_samples(url, filters, from_step, to_step)
st.plotly_chart(charts.latency_histogram(samples), key="latency_hist_chart")
st.caption(f"{len(samples):,} most recent step changes.")

trend = data.latency_trend(url, filters, "day")
st.plotly_chart(charts.latency_trend(trend), key="latency_trend_chart")
