#!/usr/bin/env bash
# The long-document table of docs/longdoc.md: every (config, seed) run, in order of importance,
# each into runs/longdoc/<dataset>-<config>-s<seed>. Resumable: a finished run (result.json) is
# skipped, an interrupted one continues with --resume from its last complete epoch, so the
# script can be stopped and started again across sittings. Wall times go to
# runs/longdoc/times.tsv (one line per process); every log line carries its UTC time. Work that
# needs the CPU meanwhile can stop the run (kill -STOP / -CONT the efformer process) and append
# "start<TAB>end" (UTC, %Y-%m-%dT%H:%M:%SZ) to runs/longdoc/pauses.tsv: scripts/longdoc-report.py
# subtracts those stops from the epoch times it reports.
#
#   scripts/longdoc-table.sh            # everything
#   scripts/longdoc-table.sh hp         # only Hyperpartisan
set -euo pipefail
cd "$(dirname "$0")/.."
EFFORMER=${EFFORMER:-target/release/efformer}
OUT=${OUT:-runs/longdoc}
mkdir -p "$OUT"
only=${1:-}

run() { # dataset config seed
  local data=$1 config=$2 seed=$3
  [[ -n $only && $only != "$data" ]] && return 0
  local dir="$OUT/$data-$config-s$seed"
  local file="configs/longdoc/$([[ $data == hp ]] && echo hyperpartisan || echo imdb)/$config.toml"
  if [[ -f $dir/result.json ]]; then
    echo "done already: $dir"
    return 0
  fi
  local resume=()
  [[ -f $dir/config.toml ]] && resume=(--resume)
  # A run stopped before its first checkpoint cannot resume: start it again.
  if [[ ${#resume[@]} -gt 0 && -z $(ls "$dir"/checkpoint/model-*.bpk 2>/dev/null) ]]; then
    rm -rf "$dir"
    resume=()
  fi
  echo "=== $(date -u +%FT%TZ) $dir ${resume[*]}"
  local start=$SECONDS
  # Every log line gets its UTC time (epoch times, and which epochs shared the CPU).
  "$EFFORMER" train "$file" --set "train.seed=$seed" --out "$dir" "${resume[@]}" 2>&1 \
    | mawk -W interactive '{ print strftime("%FT%TZ"), $0; fflush() }' >> "$dir.log" \
    || { echo "failed: $dir (see $dir.log)"; return 1; }
  printf '%s\t%s\t%s\t%s\n' "$dir" "${resume[*]:-fresh}" "$((SECONDS - start))" \
    "$(date -u +%FT%TZ)" >> "$OUT/times.tsv"
}

# Hyperpartisan (clean split): (a) truncated and (b) Longformer-4096 over three seeds, then
# (b') Performer-4096 and (c) Longformer-4096 from scratch, one seed each.
run hp truncated-512 1
run hp longformer-4096 1
run hp truncated-512 2
run hp longformer-4096 2
run hp truncated-512 3
run hp longformer-4096 3
run hp performer-4096 1
run hp scratch-longformer-4096 1
# IMDB (500 training and 500 test reviews, configs/longdoc/imdb/base.toml): one seed each.
run imdb truncated-512 1
run imdb longformer-4096 1
run imdb performer-4096 1
run imdb scratch-longformer-4096 1
