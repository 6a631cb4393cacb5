#!/usr/bin/env bash
# run_stage N "description": true when stage N lies within --stage .. --stop_stage.
run_stage() {
  local n=$1; shift
  if [ "$n" -ge "$stage" ] && [ "$n" -le "$stop_stage" ]; then
    echo "=== stage $n: $* ($(date '+%F %T'))"
    return 0
  fi
  return 1
}
