#!/usr/bin/env bash
# Turns "--name value" command-line options into shell variables that already exist,
# as Kaldi's and ESPnet's parse_options.sh do: an unknown option is an error.
while [ $# -gt 0 ]; do
  case "$1" in
    --help|-h) echo "options: see the variables at the top of $0"; exit 0 ;;
    --*=*) name="${1%%=*}"; value="${1#*=}"; shift ;;
    --*) name="$1"; value="${2:?option $1 needs a value}"; shift 2 ;;
    *) break ;;
  esac
  var="${name#--}"; var="${var//-/_}"
  if ! declare -p "$var" >/dev/null 2>&1; then
    echo "$0: unknown option $name" >&2; exit 1
  fi
  printf -v "$var" '%s' "$value"
done
