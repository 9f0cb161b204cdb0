#!/usr/bin/env bash
# waflow demo, one command: set up, migrate, start webhook + jobs + dashboard, send a simulated week of
# users through the real webhook, print the dashboard URL and sign-in, run until Ctrl-C (which stops
# every process it started).
#
# Optional environment:
#   DATABASE_URL            default sqlite:///./data/waflow.db (embedded, nothing to install);
#                           postgresql+psycopg://USER@HOST:5432/DB works the same way
#   WAFLOW_HOST             interface to listen on (default 127.0.0.1)
#   WAFLOW_PORT             webhook + admin API port (default 8000)
#   DASHBOARD_PORT          dashboard port (default 8501)
#   WAFLOW_SIMULATE_USERS   simulated users (default 200; 0 skips the simulation)
#   WAFLOW_SIMULATE_DAYS    simulated days, ending now (default 7)
#   WAFLOW_SIMULATE_SEED    default 7; the same seed sends the same wamids again, which are deduplicated
#   WAFLOW_SIMULATE_SPEED   simulated seconds per real second (default 20000: a week in ~30 s; 0: flat out)
#   WAFLOW_EXIT_AFTER_SEED  1: check the dashboard answers, then stop everything and exit (CI)
#   WAFLOW_LOG_DIR          process logs (default ./data/logs)
# The demo's secrets (app secret, verify token, admin token) are fixed demo values set here and printed;
# values already in the environment are used instead (and not printed). SEND_MODE is always dry-run here.
set -euo pipefail
cd "$(dirname "$0")/.."

HOST=${WAFLOW_HOST:-127.0.0.1}
PORT=${WAFLOW_PORT:-8000}
DASH_PORT=${DASHBOARD_PORT:-8501}
USERS=${WAFLOW_SIMULATE_USERS:-200}
DAYS=${WAFLOW_SIMULATE_DAYS:-7}
SEED=${WAFLOW_SIMULATE_SEED:-7}
SPEED=${WAFLOW_SIMULATE_SPEED:-20000}
EXIT_AFTER_SEED=${WAFLOW_EXIT_AFTER_SEED:-0}
LOG_DIR=${WAFLOW_LOG_DIR:-./data/logs}

say() { printf '==> %s\n' "$*"; }
die() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }

scripts/setup.sh
PY=.venv/bin/python
mkdir -p "$LOG_DIR" data

demo_secret() {  # name, demo value: keep a value from the environment, else use (and later print) the demo one
  if [ -n "${!1:-}" ]; then
    printf -v "shown_$1" '%s' "(from your environment)"
  else
    export "$1=$2"
    printf -v "shown_$1" '%s' "$2"
  fi
}
demo_secret WHATSAPP_APP_SECRET demo-app-secret-change-me
demo_secret WHATSAPP_VERIFY_TOKEN demo-verify-token
demo_secret ADMIN_TOKEN demo-admin-token
export SEND_MODE=dry-run   # simulated users have made-up numbers: nothing is ever sent to Meta from the demo
export DEMO_MODE=true      # the dashboard offers the demo/demo sign-in
export FLOW_ROUTES=${FLOW_ROUTES:-100000000000111=lead_qualification,100000000000222=service_booking}
export LANGUAGE_BY_PREFIX=${LANGUAGE_BY_PREFIX:-34=es,52=es}  # simulated Spanish speakers write from +34 / +52
# Demo pace: the sender marks replies sent every second, and idle sessions are archived every 10 s, so users who
# come back days later (in simulated time) find their session archived and get it restored.
export SENDER_INTERVAL_SECONDS=${SENDER_INTERVAL_SECONDS:-1}
# Dry-run sends go nowhere: no need to space one user's messages out as Meta's per-user pair rate requires.
export SEND_USER_SPACING_SECONDS=${SEND_USER_SPACING_SECONDS:-0}
export ARCHIVE_INTERVAL_SECONDS=${ARCHIVE_INTERVAL_SECONDS:-10}
export FOLLOWUPS_INTERVAL_SECONDS=${FOLLOWUPS_INTERVAL_SECONDS:-5}
export PYTHONUNBUFFERED=1

port_free() {
  "$PY" - "$HOST" "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((sys.argv[1], int(sys.argv[2])))
except OSError:
    sys.exit(1)
EOF
}
port_free "$PORT" || die "port $PORT is in use: set WAFLOW_PORT to a free port"
port_free "$DASH_PORT" || die "port $DASH_PORT is in use: set DASHBOARD_PORT to a free port"

say "migrating ${DATABASE_URL:-sqlite:///./data/waflow.db}"
core() { "$PY" -m core --log-level WARNING "$@"; }
core migrate

# Two demo follow-up campaigns, so the simulated users who stall get nudged and the campaigns page has results.
# Free text inside the 24 h window, the (dry-run) template outside it. Created while the servers start.
add_campaign() {  # name, options...: create it unless a campaign of that name exists
  local out
  if ! out=$(core campaigns add --name "$@" 2>&1); then
    case "$out" in
      *"already exists"*) ;;
      *) printf '%s\n' "$out" >&2; return 1 ;;
    esac
  fi
}
campaigns_pid=
if [ "$USERS" -gt 0 ]; then
  say "adding demo campaigns demo-email-nudge and demo-booking-nudge"
  {
    add_campaign demo-email-nudge --flow lead_qualification --step ask_email --after 2h \
      --text "Still there, {name}? Reply with your email and we'll send you the details." \
      --template lead_email_reminder --language en_US --param "{name}" --max-sends 1
    add_campaign demo-booking-nudge --flow service_booking --step choose_date --after 1h \
      --text "Your {service} is almost booked: pick a day and you're done." \
      --template booking_reminder --language en_US --param "{service}" --max-sends 1
  } &
  campaigns_pid=$!
fi

pids=()
names=()
stopping=0
cleanup() {
  local status=$?
  [ "$stopping" = 1 ] && return
  stopping=1
  trap - INT TERM EXIT
  if [ ${#pids[@]} -gt 0 ]; then
    say "stopping ${names[*]}"
    for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for _ in $(seq 1 100); do
      alive=0
      for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
      [ "$alive" = 0 ] && break
      sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start() {  # name, command...: run in the background, output to $LOG_DIR/name.log
  local name=$1; shift
  # Job control on: the process gets a process group of its own, so stopping the group stops its children too
  # (and Ctrl-C, sent to this script's group, reaches only this script, which then stops them in order).
  set -m
  "$@" >"$LOG_DIR/$name.log" 2>&1 &
  set +m
  pids+=("$!")
  names+=("$name")
}

wait_http() {  # name, url, seconds: until the URL answers 200 (or the process died)
  local name=$1 url=$2 seconds=$3 pid=${pids[-1]}
  for _ in $(seq 1 $((seconds * 5))); do
    if "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$url" 2>/dev/null; then
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || { tail -n 20 "$LOG_DIR/$name.log" >&2; die "$name exited; log: $LOG_DIR/$name.log"; }
    sleep 0.2
  done
  tail -n 20 "$LOG_DIR/$name.log" >&2
  die "$name did not answer at $url within ${seconds}s; log: $LOG_DIR/$name.log"
}

say "starting webhook server on http://$HOST:$PORT"
start webhook "$PY" -m core serve --host "$HOST" --port "$PORT"
wait_http webhook "http://$HOST:$PORT/healthz" 60
say "starting jobs (archive, follow-ups, sender, sweeper)"
start jobs "$PY" -m jobs
say "starting dashboard on http://$HOST:$DASH_PORT"
start dashboard "$PY" -m streamlit run streamlit_app.py --server.headless true --server.address "$HOST" \
  --server.port "$DASH_PORT" --browser.gatherUsageStats false
wait_http dashboard "http://$HOST:$DASH_PORT/_stcore/health" 90

if [ -n "$campaigns_pid" ]; then
  wait "$campaigns_pid" || die "could not add the demo campaigns"
fi
if [ "$USERS" -gt 0 ]; then
  say "sending a simulated ${DAYS}-day week of $USERS users through http://$HOST:$PORT/webhook"
  "$PY" -m core simulate --url "http://$HOST:$PORT/webhook" --users "$USERS" --days "$DAYS" --seed "$SEED" \
    --speed "$SPEED" --status-wait 120  # returns as soon as the sender has sent every reply
fi

cat <<EOF

  waflow is running.
    Dashboard      http://$HOST:$DASH_PORT   (sign in: demo / demo)
    Webhook        http://$HOST:$PORT/webhook   (health: /healthz, metrics: /metrics)
    Admin API      curl -H "Authorization: Bearer \$ADMIN_TOKEN" http://$HOST:$PORT/admin/sessions/PHONE_NUMBER_ID/USER_ID
    Demo secrets   WHATSAPP_APP_SECRET=$shown_WHATSAPP_APP_SECRET
                   WHATSAPP_VERIFY_TOKEN=$shown_WHATSAPP_VERIFY_TOKEN
                   ADMIN_TOKEN=$shown_ADMIN_TOKEN
    Database       ${DATABASE_URL:-sqlite:///./data/waflow.db}
    Logs           $LOG_DIR/{webhook,jobs,dashboard}.log

EOF

all_alive() {
  for i in "${!pids[@]}"; do
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      tail -n 20 "$LOG_DIR/${names[$i]}.log" >&2
      die "${names[$i]} stopped unexpectedly; log: $LOG_DIR/${names[$i]}.log"
    fi
  done
}

if [ "$EXIT_AFTER_SEED" = 1 ]; then
  all_alive
  wait_http dashboard "http://$HOST:$DASH_PORT/" 30
  say "dashboard answered; WAFLOW_EXIT_AFTER_SEED=1: stopping"
  exit 0
fi

say "press Ctrl-C to stop"
while true; do
  all_alive
  sleep 1
done
