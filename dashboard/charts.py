"""Plotly figures for the pages. Each takes a DataFrame from core.analytics and returns a figure."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

GREEN = "#128C7E"
RED = "#D64545"
PALETTE = ["#128C7E", "#25D366", "#34B7F1", "#075E54", "#F2A541", "#D64545", "#7F8C8D"]


def _layout(fig: go.Figure, title: str, height: int = 340) -> go.Figure:
    fig.update_layout(title=title, height=height, margin={"l": 10, "r": 10, "t": 50, "b": 10},
                      legend={"orientation": "h", "y": -0.2})
    return fig


def sessions_over_time(frame: pd.DataFrame) -> go.Figure:
    long = frame.melt(id_vars="bucket", value_vars=["new_sessions", "completions"], var_name="series",
                      value_name="sessions")
    fig = px.line(long, x="bucket", y="sessions", color="series", markers=True, color_discrete_sequence=PALETTE)
    return _layout(fig, "New sessions and completions")


def messages_per_hour(frame: pd.DataFrame) -> go.Figure:
    fig = px.bar(frame, x="hour", y="messages", color_discrete_sequence=[GREEN])
    return _layout(fig, "Inbound messages per hour")


def webhook_totals(frame: pd.DataFrame, title: str = "Webhook requests by result") -> go.Figure:
    fig = px.bar(frame, x="result", y="count", color="result", color_discrete_sequence=PALETTE)
    fig.update_layout(showlegend=False)
    return _layout(fig, title, 300)


def webhook_results(frame: pd.DataFrame) -> go.Figure:
    fig = px.bar(frame, x="bucket", y="count", color="result", color_discrete_sequence=PALETTE)
    return _layout(fig, "Webhook requests over time")


def states(frame: pd.DataFrame) -> go.Figure:
    long = frame[["flow", "step", "active", "archived"]].melt(
        id_vars=["flow", "step"], value_vars=["active", "archived"], var_name="status", value_name="users"
    )
    fig = px.bar(long, x="step", y="users", color="status", facet_col="flow", text="users",
                 color_discrete_sequence=PALETTE)
    fig.update_xaxes(matches=None)  # each flow shows its own steps only
    return _layout(fig, "Users in progress by current step (active and archived)", 380)


def time_in_step(frame: pd.DataFrame) -> go.Figure:
    fig = px.bar(frame, x="step", y="p50_hours_in_step", color="flow", barmode="group",
                 color_discrete_sequence=PALETTE, labels={"p50_hours_in_step": "median hours in step"})
    return _layout(fig, "How long users have been in their step (median)")


def funnel(frame: pd.DataFrame) -> go.Figure:
    fig = go.Figure(go.Funnel(y=frame["step"], x=frame["reached"], textinfo="value+percent initial",
                              marker={"color": GREEN}))
    return _layout(fig, "Users reaching each step", 380)


def funnel_breakdown(frame: pd.DataFrame, by: str) -> go.Figure:
    fig = px.bar(frame, x="step", y="conversion_pct", color="segment", barmode="group",
                 color_discrete_sequence=PALETTE, labels={"conversion_pct": "% of cohort", "segment": by})
    return _layout(fig, f"Conversion by {by.replace('_', ' ')}")


def time_to_complete(frame: pd.DataFrame) -> go.Figure:
    minutes = frame.assign(minutes=frame["seconds"] / 60)
    fig = px.histogram(minutes, x="minutes", nbins=40, color_discrete_sequence=[GREEN])
    return _layout(fig, "Time to complete (minutes from entering the flow)")


def latency_bars(frame: pd.DataFrame) -> go.Figure:
    labels = frame["from_step"].astype(str) + " → " + frame["to_step"].astype(str)
    colors = [RED if friction else GREEN for friction in frame["friction"]]
    fig = go.Figure(go.Bar(x=frame["p50"] / 60, y=labels, orientation="h", marker={"color": colors},
                           customdata=frame[["p90", "p99", "n"]],
                           hovertemplate="p50 %{x:.1f} min<br>p90 %{customdata[0]:.0f} s<br>"
                                         "p99 %{customdata[1]:.0f} s<br>n=%{customdata[2]}<extra></extra>"))
    fig.update_layout(xaxis_title="median minutes (red: friction)", yaxis={"autorange": "reversed"})
    return _layout(fig, "Median time per step change", 60 + 36 * max(len(frame), 3))


def latency_histogram(frame: pd.DataFrame) -> go.Figure:
    minutes = frame.assign(minutes=frame["seconds"] / 60)
    fig = px.histogram(minutes, x="minutes", nbins=50, color_discrete_sequence=[GREEN])
    return _layout(fig, "Distribution of step-change latency (minutes)")


def latency_trend(frame: pd.DataFrame) -> go.Figure:
    long = frame.melt(id_vars="bucket", value_vars=["p50", "p90"], var_name="percentile", value_name="seconds")
    long["minutes"] = long["seconds"] / 60
    fig = px.line(long, x="bucket", y="minutes", color="percentile", markers=True, color_discrete_sequence=PALETTE)
    return _layout(fig, "Step-change latency over time")


def stalled_by_step(frame: pd.DataFrame) -> go.Figure:
    counts = frame.groupby(["flow", "step", "inside_window"]).size().rename("users").reset_index()
    counts["window"] = counts["inside_window"].map({True: "inside 24 h window", False: "outside window"})
    fig = px.bar(counts, x="step", y="users", color="window", facet_col="flow", color_discrete_sequence=PALETTE)
    fig.update_xaxes(matches=None)  # each flow shows its own steps only
    return _layout(fig, "Stalled users by step")


def campaign_results(frame: pd.DataFrame) -> go.Figure:
    measures = ["targeted", "sent", "delivered", "read", "failed", "replied", "recovered", "skipped", "cancelled"]
    long = frame.melt(id_vars="campaign", value_vars=measures, var_name="measure", value_name="sessions")
    fig = px.bar(long, x="measure", y="sessions", color="campaign", barmode="group", color_discrete_sequence=PALETTE)
    return _layout(fig, "Results per campaign", 380)


def failures_by_code(frame: pd.DataFrame, title: str = "Failures by error code") -> go.Figure:
    x = frame["error_code"] if "error_code" in frame else frame["code"].astype(str)
    color = frame["source"] if "source" in frame else None
    fig = px.bar(frame, x=x.astype(str), y="count", color=color, color_discrete_sequence=[RED, "#F2A541"])
    fig.update_layout(xaxis_title="Meta error code", xaxis_type="category")
    return _layout(fig, title, 300)


def apply_latency(frame: pd.DataFrame) -> go.Figure:
    long = frame.melt(id_vars="bucket", value_vars=["p50", "p90", "p99"], var_name="percentile", value_name="seconds")
    fig = px.line(long, x="bucket", y="seconds", color="percentile", markers=True, color_discrete_sequence=PALETTE)
    return _layout(fig, "Apply latency (stored → applied), seconds")


def outbox_backlog(frame: pd.DataFrame) -> go.Figure:
    fig = px.bar(frame, x="status", y="messages", color="status", color_discrete_sequence=PALETTE)
    fig.update_layout(showlegend=False)
    return _layout(fig, "Outbox by status", 300)
