#!/usr/bin/env bash
# Helpers shared by the recipes (source it after parse_options.sh).
#
#   run_stage N "description"   true when stage N lies within --stage .. --stop_stage
#   die "message"               print "<recipe>: error: message" to stderr and exit 1
#   require_dir DIR "what" ["hint"]    / require_file FILE "what" ["hint"]
#   require_disk DIR GB         at least GB gigabytes free on DIR's file system
#   is_done STAMP [SIG] / mark_done STAMP [SIG]   a finished step leaves a stamp; rerunning it is a no-op
#   run_logged LOG cmd ...      run cmd, output to the terminal and appended to LOG

run_stage() {
  local n=$1; shift
  if [ "$n" -ge "$stage" ] && [ "$n" -le "$stop_stage" ]; then
    echo "=== stage $n: $* ($(date '+%F %T'))"
    return 0
  fi
  return 1
}

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 1
}

require_dir() {
  [ -d "$1" ] || die "$2 not found: $1 is not a directory${3:+ ($3)}"
}

require_file() {
  [ -f "$1" ] || die "$2 not found: $1 is missing${3:+ ($3)}"
}

require_disk() {
  local dir=$1 need_gb=$2 free_kb
  mkdir -p "$dir"
  free_kb=$(df -Pk "$dir" | awk 'NR==2 {print $4}')
  if [ -n "$free_kb" ] && [ "$free_kb" -lt $((need_gb * 1024 * 1024)) ]; then
    die "not enough free disk space on $dir: $((free_kb / 1024 / 1024)) GB free, about $need_gb GB needed (--min_free_gb)"
  fi
}

# is_done STAMP [SIGNATURE]: true (and says so) when the step that writes STAMP has finished.
# With SIGNATURE (the options the step depends on), a stamp written with other options is an
# error rather than a silent reuse of outputs made differently.
is_done() {
  [ -f "$1" ] || return 1
  if [ $# -ge 2 ] && [ "$(sed -n 2p "$1")" != "$2" ]; then
    die "$1 was made with other options ($(sed -n 2p "$1")); now: $2. Delete it (and the outputs next to it) to redo, or use another --datadir/--expdir"
  fi
  echo "already done ($1 exists; delete it to redo this step)"
  return 0
}

mark_done() {
  mkdir -p "$(dirname "$1")"
  { date '+%F %T'; [ $# -lt 2 ] || echo "$2"; } > "$1"
}

run_logged() {
  local log=$1; shift
  mkdir -p "$(dirname "$log")"
  echo "# $*" >> "$log"
  echo "# started $(date '+%F %T')" >> "$log"
  echo "(log: $log)"
  local rc=0
  # set -e does not apply on the left of ||, so rc is read right after the pipeline.
  { "$@" 2>&1 | tee -a "$log"; rc=${PIPESTATUS[0]}; } || true
  if [ "$rc" -ne 0 ]; then
    echo "# failed with status $rc at $(date '+%F %T')" >> "$log"
    die "command failed (status $rc): $* -- see $log"
  fi
  echo "# finished $(date '+%F %T')" >> "$log"
}
