"""The sign-in gate: nothing but the login form until a user from DASHBOARD_USERS (or secrets) signs in."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import streamlit as st

from core.auth import (
    DEMO_PASSWORD,
    DEMO_USER,
    LOGIN_THROTTLE,
    CredentialsError,
    User,
    authenticate,
    client_key,
    load_users,
    user_key,
)
from core.config import Settings

SESSION_KEY = "auth_user"


def _secrets() -> Mapping[str, Any] | None:
    try:
        return dict(st.secrets) if len(st.secrets) else None
    except Exception:  # noqa: BLE001 - no secrets.toml at all is the usual case, and Streamlit raises for it
        return None


def require_login() -> dict[str, str]:
    """The signed-in user as {"name", "role"}; otherwise draw the login form and stop the script run."""
    signed_in = st.session_state.get(SESSION_KEY)
    if signed_in:
        return dict(signed_in)
    settings = Settings()
    st.title("waflow dashboard")
    try:
        users = load_users(settings, _secrets())
    except CredentialsError as e:
        st.error(f"Dashboard users are misconfigured: {e}")
        st.stop()
    if settings.demo_mode:
        st.info(f"Demo mode: sign in as **{DEMO_USER}** / **{DEMO_PASSWORD}** (admin). Never enable DEMO_MODE in "
                "production.")
    if not users:
        st.error(
            "No dashboard users are configured. Set DASHBOARD_USERS to `name:role:hash` entries (hash from "
            "`python -m core hash-password`), or DEMO_MODE=true for a demo."
        )
        st.stop()
    with st.form("login"):
        name = st.text_input("User", key="login_user")
        password = st.text_input("Password", type="password", key="login_password")
        submitted = st.form_submit_button("Sign in")
    if submitted:
        _sign_in(users, name, password)
    st.stop()
    raise AssertionError("unreachable: st.stop() ends the run")


def _sign_in(users: Mapping[str, User], name: str, password: str) -> None:
    keys = [user_key(name), client_key(st.context.headers.get("X-Forwarded-For"), st.context.ip_address)]
    wait = LOGIN_THROTTLE.wait(keys)
    if wait > 0:
        # Refused before the password is looked at: a throttled guess costs us nothing and tells nothing.
        st.error(f"Too many failed sign-ins. Try again in {math.ceil(wait)} s.")
        return
    user = authenticate(users, name, password)
    if user is None:
        LOGIN_THROTTLE.failed(keys)
        st.error("Wrong user name or password.")
        return
    LOGIN_THROTTLE.succeeded(keys[0])
    st.session_state[SESSION_KEY] = {"name": user.name, "role": user.role}
    st.rerun()


def account_sidebar(user: Mapping[str, str]) -> None:
    with st.sidebar:
        st.caption(f"Signed in as **{user['name']}** ({user['role']})")
        if st.button("Sign out", key="sign_out"):
            st.session_state.pop(SESSION_KEY, None)
            st.rerun()
