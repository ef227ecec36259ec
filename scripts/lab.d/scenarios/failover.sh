# shellcheck shell=bash
# Scenario failover: a protected guest survives the power loss of its host.
#
# host1 runs a guest (memory writer, console heartbeat "kemari-guest alive N" every 2 s) protected
# by `kemari replicate` to `kemari receive --failover` on host2, with the UDP heartbeat between the
# two. Some seconds into protection host1's QEMU is SIGKILLed (power loss); host2 declares the
# primary dead and runs the guest from the last ACKed checkpoint. PASS when the guest's console
# heartbeat continues on host2, with the counter continuing from where it was at the last ACK.
#
# Knobs (environment), for the experiments of docs/failover.md:
#   FO_GUEST=pvh|hvm          guest type (default pvh)
#   FO_QUIESCE=suspend|pause  checkpoints at a cooperative suspend point (--suspend) or a pause
#   FO_METHOD=restore|in-place  how host2 resumes (kemari receive --failover-method)
#   FO_HB_MS, FO_HB_MISSES    heartbeat period and misses (default 500 ms x 6: TCG is slow)
#   FO_INTERVAL_MS            maximum epoch (default 500)
#   FO_PROTECT_S              seconds of protection before the kill (default 15)
#   FO_KILL=host1|host2       whose power fails (host2: the primary must go on unprotected)

FO_GUEST=${FO_GUEST:-pvh}
FO_QUIESCE=${FO_QUIESCE:-suspend}
FO_METHOD=${FO_METHOD:-restore}
FO_HB_MS=${FO_HB_MS:-500}
FO_HB_MISSES=${FO_HB_MISSES:-6}
FO_INTERVAL_MS=${FO_INTERVAL_MS:-500}
FO_PROTECT_S=${FO_PROTECT_S:-15}
FO_KILL=${FO_KILL:-host1}
FO_PORT=${FO_PORT:-7300}
FO_HB_PORT=${FO_HB_PORT:-7301}
name=fo-$FO_GUEST
lab_say "failover: guest $FO_GUEST, checkpoints by $FO_QUIESCE, resume by $FO_METHOD, heartbeat ${FO_HB_MS} ms x $FO_HB_MISSES"
lab_figure guest "$FO_GUEST"
lab_figure quiesce "$FO_QUIESCE"
lab_figure method "$FO_METHOD"
lab_figure heartbeat_period_ms "$FO_HB_MS"
lab_figure heartbeat_misses "$FO_HB_MISSES"

lab_step "boot 2 hosts"
lab_boot_hosts 2

lab_step "create a $FO_GUEST guest with a memory writer on host1"
lab_create_guest host1 "$FO_GUEST" "$name" "mem=128" "extra=lab.memwrite=256"
lab_wait_console host1 "$name" 'kemari-guest memory writer' 180 || lab_fail "$name did not start"

lab_step "kemari receive --failover on host2"
lab_run host2 "mkdir -p /var/lib/kemari && rm -rf /var/lib/kemari/spool-*"
lab_run host2 "setsid sh -c 'RUST_LOG=info kemari --json receive --listen 0.0.0.0:$FO_PORT --spool-dir /var/lib/kemari/spool-fo --once --heartbeat-listen 0.0.0.0:$FO_HB_PORT --heartbeat-ms $FO_HB_MS --heartbeat-misses $FO_HB_MISSES --failover --failover-method $FO_METHOD >/var/lib/kemari/receive-fo.json 2>/var/lib/kemari/receive-fo.log' </dev/null >/dev/null 2>&1 &"
sleep 2

lab_step "kemari replicate on host1 (heartbeat, checkpoints by $FO_QUIESCE)"
qflag=""
[ "$FO_QUIESCE" = suspend ] && qflag="--suspend --suspend-timeout-s 30"
lab_run host1 "setsid sh -c 'RUST_LOG=info kemari replicate $name $(lab_host_ip host2):$FO_PORT --interval-ms $FO_INTERVAL_MS --ack-timeout-s 60 $qflag --heartbeat-port $FO_HB_PORT --heartbeat-ms $FO_HB_MS --heartbeat-misses $FO_HB_MISSES >/tmp/replicate-fo.out 2>/tmp/replicate-fo.log & echo \$! >/tmp/replicate-fo.pid' </dev/null >/dev/null 2>&1"
ok=0
for _ in $(seq 240); do
  if lab_run host1 "grep -q 'ACKed after' /tmp/replicate-fo.log" 30; then ok=1; break; fi
  if ! lab_run host1 'kill -0 "$(cat /tmp/replicate-fo.pid)" 2>/dev/null' 30; then break; fi
  sleep 1
done
[ "$ok" = 1 ] || {
  lab_run host1 "cat /tmp/replicate-fo.log" || true
  lab_run host2 "cat /var/lib/kemari/receive-fo.log" || true
  lab_fail "initial sync did not finish"
}
lab_run host1 "grep 'initial sync' /tmp/replicate-fo.log | tail -2"

lab_step "protected for ${FO_PROTECT_S} s"
f1=$(lab_guest_console_file host1 "$name")
sleep "$FO_PROTECT_S"
lab_run host1 "tail -3 /tmp/replicate-fo.log" || true
lab_run host1 "xl list $name" || true

if [ "$FO_KILL" = host2 ]; then
  lab_step "power loss of host2, the secondary (SIGKILL of its QEMU)"
  t0=$(lab_now)
  lab_kill host2
  gone=0
  for _ in $(seq 120); do
    if ! lab_run host1 'kill -0 "$(cat /tmp/replicate-fo.pid)" 2>/dev/null' 30; then gone=1; break; fi
    sleep 0.5
  done
  lab_figure secondary_loss_to_exit_s "$(lab_since "$t0")"
  lab_run host1 "tail -5 /tmp/replicate-fo.log"
  [ "$gone" = 1 ] || lab_fail "kemari replicate still running 60 s after the secondary died"
  lab_run host1 "grep 'SECONDARY LOST' /tmp/replicate-fo.log | grep -q 'heartbeat'" ||
    lab_fail "the primary did not report the secondary lost by heartbeat"
  lab_guest_live host1 "$name" || lab_fail "$name is not running on host1 after the secondary's loss"
  c1=$(grep -c 'kemari-guest alive' "$f1")
  sleep 6
  c2=$(grep -c 'kemari-guest alive' "$f1")
  [ "$c2" -gt "$c1" ] || lab_fail "$name's console heartbeat stopped on host1 ($c1 -> $c2)"
  lab_say "secondary loss PASS: the guest runs on, unprotected, on host1"
  return 0
fi

lab_step "power loss of host1 (SIGKILL of its QEMU)"
last1=$(grep -o 'kemari-guest alive [0-9]*' "$f1" | tail -1 | awk '{print $3}')
t0=$(lab_now)
lab_kill host1
last1_after=$(grep -o 'kemari-guest alive [0-9]*' "$f1" | tail -1 | awk '{print $3}')
lab_say "host1's guest printed 'alive ${last1_after:-none}' last (${last1:-none} just before the kill)"
lab_figure counter_at_kill "${last1_after:-0}"

lab_step "host2 fails over"
rjson=
for _ in $(seq 180); do
  rjson=$(lab_run host2 "cat /var/lib/kemari/receive-fo.json" 30) || true
  [ -n "$rjson" ] && break
  sleep 1
done
seen_s=$(lab_since "$t0")
lab_run host2 "cat /var/lib/kemari/receive-fo.log"
[ -n "$rjson" ] || lab_fail "kemari receive did not finish within 180 s of the kill"
echo "$rjson"
read -r fo_ok checkpoints hb_ms last_seq domid < <(echo "$rjson" | python3 -c '
import json, sys
r = json.load(sys.stdin)
f = r.get("failover")
if not f:
    print("no", r.get("checkpoints"), 0, -1, -1)
else:
    print("yes", r.get("checkpoints"), round(f["heartbeat_to_running_ms"]), f["report"]["seq"], f["report"]["domid"])
')
lab_figure checkpoints_before_kill "$checkpoints"
[ "$fo_ok" = yes ] || lab_fail "no failover: $rjson"
lab_figure last_heartbeat_to_running_ms "$hb_ms"
lab_figure last_acked_seq "$last_seq"
lab_figure kill_to_failover_seen_s "$seen_s"
lab_run host2 "xl list"

lab_step "the guest runs on host2 and its console heartbeat continues"
f2=$(lab_guest_console_file host2 "$name")
running=1
if ! lab_wait_console host2 "$name" 'kemari-guest alive [0-9]+' 90; then
  running=0
fi
# Evidence either way: CPU time and the vCPU's rip twice, 5 s apart, and the console's tail.
for i in 1 2; do
  lab_run host2 "xl list -v $name 2>/dev/null | tail -1; kemari debug cpu-context $name 2>&1 | head -2" || true
  [ "$i" = 1 ] && sleep 5
done
lab_say "host2 console of $name (tail):"
tail -25 "$f2" >&2 2>/dev/null || true
[ "$running" = 1 ] || lab_fail "the guest's console heartbeat did not resume on host2 within 90 s of the failover ($FO_GUEST, $FO_QUIESCE, $FO_METHOD)"
first2=$(grep -o 'kemari-guest alive [0-9]*' "$f2" | head -1 | awk '{print $3}')
lab_wait_console host2 "$name" "kemari-guest alive $((first2 + 2))([^0-9]|\$)" 60 ||
  lab_fail "the guest printed 'alive $first2' on host2, then stopped"
lab_figure counter_first_on_host2 "$first2"
lab_say "console heartbeat: host1 last 'alive ${last1_after:-?}', host2 first 'alive $first2', then $((first2 + 2))"
# The replica is the last ACKed state: at most one beat ahead of host1's last output (the beat
# after the checkpoint), and not far behind it (checkpoints every ${FO_INTERVAL_MS} ms).
[ -n "$last1_after" ] || lab_fail "host1's guest printed no heartbeat before the kill"
[ "$first2" -le $((last1_after + 1)) ] || lab_fail "host2's counter $first2 is ahead of host1's last $last1_after"
[ "$first2" -ge $((last1_after - 3)) ] || lab_fail "host2's counter $first2 is far behind host1's last $last1_after"
lab_guest_live host2 "$name" || lab_fail "$name is not running on host2"
lab_run host2 "grep -q 'PRIMARY WITHOUT PROTECTION' /var/lib/kemari/receive-fo.log" ||
  lab_fail "host2 did not report itself primary without protection"
lab_say "failover PASS: $FO_GUEST guest continued on host2 ${hb_ms} ms after host1's last heartbeat (checkpoints before the kill: $checkpoints, last seq $last_seq)"
