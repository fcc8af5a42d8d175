#!/usr/bin/env bash
# OpenAPI fuzzing of `cafe-ray serve`: schemathesis, in a venv of its own (not a dev
# dependency), against a live server on loopback. Every operation of the served schema gets
# generated valid and invalid requests; the run fails on any 5xx, a status code or content
# type the schema does not declare, a response that does not match its schema, an invalid
# request answered 2xx, or a wrong method not answered 405 with an Allow header.
#
#   benchmarks/serve_fuzz.sh [RUN_DIR]      (or: make fuzz-serve)
#
# RUN_DIR: a run to serve (default: a 2-round digits quickstart trained into a temp dir).
# Environment: CAFE_RAY (the CLI, default .venv/bin/cafe-ray), FUZZ_VENV (default .fuzz-venv),
# FUZZ_EXAMPLES (generated requests per operation and phase, default 100), PORT.
set -euo pipefail
cd "$(dirname "$0")/.."
CAFE_RAY=${CAFE_RAY:-.venv/bin/cafe-ray}
FUZZ_VENV=${FUZZ_VENV:-.fuzz-venv}
EXAMPLES=${FUZZ_EXAMPLES:-100}
PORT=${PORT:-8765}
SCHEMATHESIS=schemathesis==4.32.5

if [ ! -x "$FUZZ_VENV/bin/st" ]; then
  python3 -m venv "$FUZZ_VENV"
  "$FUZZ_VENV/bin/pip" install -q "$SCHEMATHESIS"
fi
TMP=$(mktemp -d)
RUN=${1:-}
if [ -z "$RUN" ]; then
  "$CAFE_RAY" simulate -s round.num_rounds=2 -s "output_dir=$TMP/runs" -s name=fuzz --no-progress >/dev/null
  RUN=$(ls -d "$TMP"/runs/fuzz-*)
fi
"$CAFE_RAY" serve "$RUN" --port "$PORT" --no-access-log >"$TMP/serve.log" 2>&1 &
SERVER=$!
cleanup() { kill -TERM "$SERVER" 2>/dev/null && wait "$SERVER" || true; rm -rf "$TMP"; }
trap cleanup EXIT
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break
  kill -0 "$SERVER" 2>/dev/null || { cat "$TMP/serve.log"; exit 1; }
  sleep 1
done
# positive_data_acceptance is left out: the schema cannot say a sample's shape (it is the served
# model's, GET /v1/clients/{id}), so schema-valid inputs of another shape are rightly 422.
"$FUZZ_VENV/bin/st" run "http://127.0.0.1:$PORT/openapi.json" --checks all \
  --exclude-checks positive_data_acceptance --max-examples "$EXAMPLES" --seed 0 --workers 1 \
  --request-timeout 60 --suppress-health-check too_slow,filter_too_much --no-color "${@:2}"
