#!/usr/bin/env bash
# The whole test suite: set up, lint, type-check, then pytest on SQLite and PostgreSQL with a real browser.
#   TEST_DATABASE_URL  PostgreSQL server used for per-test databases
#                      (default postgresql+psycopg://postgres@127.0.0.1:5432/test)
#   CI=true            a missing PostgreSQL or browser fails the run instead of skipping
# Extra arguments go to pytest, e.g. scripts/test.sh -k engine
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

if ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing chromium for the dashboard browser test"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } \
      || echo "could not install chromium; the browser test will report it"
  else
    echo "chromium is missing and cannot be installed here; the browser test will report it"
  fi
fi

# In CI a stopped local PostgreSQL is started rather than reported (the machine's own service).
if [ "${CI:-}" = "true" ] && command -v pg_ctlcluster >/dev/null 2>&1 && [ -z "${TEST_DATABASE_URL:-}" ]; then
  if ! .venv/bin/python -c "import psycopg; psycopg.connect('host=127.0.0.1 user=postgres dbname=test', connect_timeout=3).close()" 2>/dev/null; then
    echo "==> starting local PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  fi
fi

echo "==> ruff"
.venv/bin/ruff check .
echo "==> mypy"
.venv/bin/mypy
echo "==> pytest"
exec .venv/bin/python -m pytest "$@"
