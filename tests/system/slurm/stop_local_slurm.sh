#!/usr/bin/env bash
# Stop the cluster started by start_local_slurm.sh, by PID file only (never by name).
D=${1:?dir}
alive(){ [ -e "/proc/$1" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }  # zombie = exited (PID 1 reaps lazily here)
stop(){ for p in "$@"; do kill "$p" 2>/dev/null; done
  for i in $(seq 100); do a=0; for p in "$@"; do alive "$p" && a=1; done; [ $a = 0 ] && return; sleep 0.1; done
  for p in "$@"; do alive "$p" && kill -9 "$p" 2>/dev/null; done; }
pids=(); for f in slurmd.pid slurmctld.pid; do [ -s "$D/$f" ] && pids+=("$(cat "$D/$f")"); done
[ ${#pids[@]} -gt 0 ] && stop "${pids[@]}"
[ -s "$D/munge/munged.pid" ] && stop "$(cat "$D/munge/munged.pid")"
true
