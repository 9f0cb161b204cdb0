"""waflow dashboard: `streamlit run streamlit_app.py`. Sign-in first, then the pages under dashboard/pages/."""

import streamlit as st

from dashboard import data
from dashboard.login import account_sidebar, require_login


def main() -> None:
    st.set_page_config(page_title="waflow", page_icon=":material/chat:", layout="wide")
    if problem := data.startup_problem():  # bad settings or no database: a message, not an exception box
        st.error(problem)
        st.stop()

    user = require_login()  # an unauthenticated visitor sees only the login form: this stops the script
    account_sidebar(user)

    st.navigation(
        [
            st.Page("dashboard/pages/overview.py", title="Overview", icon=":material/dashboard:", default=True),
            st.Page("dashboard/pages/states.py", title="States", icon=":material/explore:"),
            st.Page("dashboard/pages/funnel.py", title="Funnel", icon=":material/filter_alt:"),
            st.Page("dashboard/pages/latency.py", title="Transition latency", icon=":material/timer:"),
            st.Page("dashboard/pages/stalled.py", title="Stalled users", icon=":material/hourglass_empty:"),
            st.Page("dashboard/pages/campaigns.py", title="Campaigns", icon=":material/campaign:"),
            st.Page("dashboard/pages/health.py", title="Health", icon=":material/monitor_heart:"),
            st.Page("dashboard/pages/operations.py", title="Operations", icon=":material/build:"),
        ]
    ).run()


# Streamlit runs this file as __main__. Anything else that imports it must not start the app: a process spawned by
# multiprocessing after a test ran the dashboard re-imports the parent's main script (as __mp_main__).
if __name__ == "__main__":
    main()
