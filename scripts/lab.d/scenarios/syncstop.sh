# shellcheck shell=bash
# Scenario syncstop: `kemari replicate` stopped by SIGTERM in the middle of protection (as systemd
# or an operator's kill would) ends cleanly: it finishes the checkpoint in progress, prints its
# stats and leaves the guest RUNNING (never paused between a pause and its
# unpause); the secondary sees the stream end and keeps its replica paused at the last ACK.

SS_PORT=${SS_PORT:-7200}

lab_step "boot 2 hosts"
lab_boot_hosts 2

lab_step "create a PVH guest with a memory writer"
lab_create_guest host1 pvh stop-pvh "mem=128" "extra=lab.memwrite=256"
lab_wait_console host1 stop-pvh 'kemari-guest memory writer' 120

lab_step "kemari receive on host2"
# dom0's /var/lib is a small RAM disk: spools left by earlier scenarios on reused hosts (each a
# ~130 MiB image) would fill it and kill the receiver with ENOSPC.
lab_run host2 "mkdir -p /var/lib/lab /var/lib/kemari && rm -rf /var/lib/kemari/spool-* && truncate -s 16M /var/lib/lab/stop-pvh.img"
lab_run host2 "setsid sh -c 'kemari --json receive --listen 0.0.0.0:$SS_PORT --spool-dir /var/lib/kemari/spool-stop --once >/var/lib/kemari/receive-stop.json 2>/var/lib/kemari/receive-stop.log' </dev/null >/dev/null 2>&1 &"
sleep 2

lab_step "kemari replicate in the background (no checkpoint limit)"
lab_run host1 "setsid sh -c 'kemari replicate stop-pvh $(lab_host_ip host2):$SS_PORT --interval-ms 100 >/tmp/replicate-stop.out 2>/tmp/replicate-stop.log & echo \$! >/tmp/replicate-stop.pid' </dev/null >/dev/null 2>&1"
ok=0
for _ in $(seq 180); do
  if lab_run host1 "grep -q 'ACKed after' /tmp/replicate-stop.log" 30; then ok=1; break; fi
  sleep 1
done
[ "$ok" = 1 ] || {
  lab_run host1 "cat /tmp/replicate-stop.log" || true
  lab_run host2 "cat /var/lib/kemari/receive-stop.log; df -h /var/lib/kemari" || true
  lab_fail "initial sync did not finish"
}
sleep 5

lab_step "SIGTERM to kemari replicate while it takes checkpoints"
t0=$(lab_now)
lab_run host1 'kill -TERM "$(cat /tmp/replicate-stop.pid)"'
gone=0
for _ in $(seq 60); do
  if ! lab_run host1 'kill -0 "$(cat /tmp/replicate-stop.pid)" 2>/dev/null' 30; then gone=1; break; fi
  sleep 0.5
done
lab_run host1 "cat /tmp/replicate-stop.log; cat /tmp/replicate-stop.out"
[ "$gone" = 1 ] || lab_fail "kemari replicate still running 30 s after SIGTERM"
lab_figure stop_s "$(lab_since "$t0")"
lab_run host1 "grep -q 'SIGTERM received' /tmp/replicate-stop.log" || lab_fail "replicate did not report the signal"
stats=$(lab_run host1 "cat /tmp/replicate-stop.out")
n=$(echo "$stats" | sed -n 's/.*checkpoints=\([0-9]*\).*/\1/p')
[ -n "$n" ] && [ "$n" -gt 0 ] || lab_fail "no stats line with checkpoints after the stop: $stats"
lab_figure checkpoints_before_stop "$n"

lab_step "the guest runs on, unpaused, writing memory"
lab_guest_live host1 stop-pvh || lab_fail "stop-pvh is not running after the stop"
f=$(lab_guest_console_file host1 stop-pvh)
c1=$(grep -c 'kemari-guest alive' "$f")
sleep 6
c2=$(grep -c 'kemari-guest alive' "$f")
[ "$c2" -gt "$c1" ] || lab_fail "stop-pvh heartbeat stopped after the stop ($c1 -> $c2)"

lab_step "the secondary saw the stream end and holds its replica paused"
rjson=
for _ in $(seq 60); do
  rjson=$(lab_run host2 "cat /var/lib/kemari/receive-stop.json" 30) || true
  [ -n "$rjson" ] && break
  sleep 1
done
lab_run host2 "cat /var/lib/kemari/receive-stop.log"
[ -n "$rjson" ] || lab_fail "kemari receive did not finish after the primary stopped"
replica=$(echo "$rjson" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["replica"]); sys.exit(0 if r["acked"] else "nothing acked")') ||
  lab_fail "receiver: $rjson"
rst=$(lab_run host2 "xl list | awk -v id=$replica '\$2 == id {print \$5}'")
case "$rst" in *p*) ;; *) lab_fail "replica $replica is not paused (state '$rst')" ;; esac
