# shellcheck shell=bash
# Scenario reprotect: after a failover, the guest is protected again to a fresh host and
# survives a second host loss.
#
# 1. scenarios/failover.sh (FO_KEEP_GUEST=1): the guest with its disk protected from host1 to
#    host2, host1 killed, the guest runs on host2 (disk served by host2's kemari receive), which
#    reports itself "primary, unprotected".
# 2. host1 boots again (fresh: nothing of the first run's state; the hosts are linked by UDP
#    sockets, LAB_NET_MODE=udp, so host2 keeps its network), runs kemari receive --failover.
# 3. On host2: xl pause, SIGUSR1 to kemari receive (it hands the disk over: device and ring left
#    for a takeover), the disk copied to host1, `kemari protect GUEST host1 --disk COPY --unpause`
#    (takes the disk over in the Attached state, full initial sync, suspend checkpoints).
# 4. Power loss of host2 after RP_PROTECT_S s: host1 resumes the guest; its console heartbeat and
#    disk writer go on, and every record the guest saw written (on host1 in its first life and on
#    host2) is on host1's disk: lost must be 0.

export LAB_NET_MODE=udp
RP_PROTECT_S=${RP_PROTECT_S:-10}
FO_KILL=host1 FO_KILL_AT=${FO_KILL_AT:-random} FO_DISK=1 FO_TCP=0 FO_KEEP_GUEST=1
FO_PROTECT_S=${FO_PROTECT_S:-8}
# shellcheck source=failover.sh
source "$LAB_DIR/scenarios/failover.sh"
lab_run host2 "grep -q 'role: primary, unprotected' /var/lib/kemari/receive-fo.log" ||
  lab_fail "host2 did not log its role 'primary, unprotected'"
echo "$rjson" | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["failover"]["role"] == "primary, unprotected" else 1)' ||
  lab_fail "host2's JSON does not give its role as 'primary, unprotected'"
life1_disk=$acked_disk

lab_step "host1 boots again, fresh"
t_boot=$(lab_now)
lab_boot_host host1 || lab_fail "host1 did not boot again"
lab_figure reboot_s "$(lab_since "$t_boot")"
# xl restore on host1 appends to the console log of the guest's first life there
c1=$(lab_guest_console_file host1 "$name")
[ -e "$c1" ] && mv "$c1" "${c1%.log}.life1.log"
lab_run host1 "ping -c 2 -W 3 $(lab_host_ip host2) >/dev/null" 60 || lab_fail "host1 cannot reach host2 after its reboot"
RP_COPY=/var/lib/lab/rp-copy.img

lab_step "host2 hands the guest's disk over (guest paused)"
lab_run host2 "xl pause $name"
# shellcheck disable=SC2016 # expanded in dom0
lab_run host2 'kill -USR1 "$(cat /var/lib/kemari/receive-fo.pid)"'
gone=0
for _ in $(seq 60); do
  # shellcheck disable=SC2016
  lab_run host2 '! kill -0 "$(cat /var/lib/kemari/receive-fo.pid)" 2>/dev/null' 30 && { gone=1; break; }
  sleep 0.5
done
lab_run host2 "tail -3 /var/lib/kemari/receive-fo.log; sed -n 2p /var/lib/kemari/receive-fo.json" || true
[ "$gone" = 1 ] || lab_fail "kemari receive on host2 did not end after SIGUSR1"
lab_run host2 "grep -q 'handed over' /var/lib/kemari/receive-fo.log" || lab_fail "kemari receive did not hand the disk over"

lab_step "copy host2's disk to host1 (guest paused)"
lab_copy_out host2 "$FO_COPY" "$LAB_RUN/reprotect.img"
lab_copy_in host1 "$LAB_RUN/reprotect.img" "$RP_COPY"
rm -f "$LAB_RUN/reprotect.img"
a=$(lab_run host2 "sha1sum $FO_COPY" | cut -c1-40)
b=$(lab_run host1 "sha1sum $RP_COPY" | cut -c1-40)
[ "$a" = "$b" ] || lab_fail "host1's copy differs from host2's disk"

lab_step "kemari receive --failover on host1"
lab_run host1 "mkdir -p /var/lib/kemari /run/kemari && rm -rf /var/lib/kemari/spool-rp"
lab_run host1 "setsid sh -c 'echo \$\$ >/var/lib/kemari/receive-rp.pid; RUST_LOG=info exec kemari --json receive --listen 0.0.0.0:$FO_PORT --spool-dir /var/lib/kemari/spool-rp --once --heartbeat-listen 0.0.0.0:$FO_HB_PORT --heartbeat-ms $FO_HB_MS --heartbeat-misses $FO_HB_MISSES --failover --disk $RP_COPY >/var/lib/kemari/receive-rp.json 2>/var/lib/kemari/receive-rp.log' </dev/null >/dev/null 2>&1 &"
sleep 2

lab_step "kemari protect on host2 (disk taken over, guest unpaused after the initial sync)"
t_prot=$(lab_now)
lab_run host2 "setsid sh -c 'RUST_LOG=info kemari protect $name $(lab_host_ip host1):$FO_PORT --interval-ms $FO_INTERVAL_MS --ack-timeout-s 60 --suspend --suspend-timeout-s 120 --heartbeat-port $FO_HB_PORT --heartbeat-ms $FO_HB_MS --heartbeat-misses $FO_HB_MISSES --disk $FO_COPY --unpause >/tmp/protect-rp.out 2>/tmp/protect-rp.log & echo \$! >/tmp/protect-rp.pid' </dev/null >/dev/null 2>&1"
ok=0
for _ in $(seq 240); do
  lab_run host2 "grep -q 'ACKed after' /tmp/protect-rp.log" 30 && { ok=1; break; }
  # shellcheck disable=SC2016
  lab_run host2 'kill -0 "$(cat /tmp/protect-rp.pid)" 2>/dev/null' 30 || break
  sleep 1
done
lab_run host2 "grep -E 'taking over|served from|initial sync:|fence' /tmp/protect-rp.log | tail -6" || true
[ "$ok" = 1 ] || {
  lab_run host2 "tail -20 /tmp/protect-rp.log" || true
  lab_run host1 "tail -20 /var/lib/kemari/receive-rp.log" || true
  lab_fail "kemari protect: the initial sync to host1 did not finish"
}
lab_figure protect_initial_sync_s "$(lab_since "$t_prot")"
n_before=$(grep -c 'kemari-disk wrote' "$f2" || true)
ok=0
for _ in $(seq 120); do
  n=$(grep -c 'kemari-disk wrote' "$f2" || true)
  [ "$n" -gt $((n_before + 2)) ] && { ok=1; break; }
  sleep 0.5
done
[ "$ok" = 1 ] || { lab_run host2 "tail -10 /tmp/protect-rp.log" || true; lab_fail "the guest's disk writer does not go on under the new protection"; }

lab_step "protected again for ${RP_PROTECT_S} s"
sleep "$RP_PROTECT_S"
# shellcheck disable=SC2016
lab_run host2 'kill -0 "$(cat /tmp/protect-rp.pid)" 2>/dev/null' 30 || {
  lab_run host2 "tail -10 /tmp/protect-rp.log" || true
  lab_fail "kemari protect ended before the kill"
}
lab_run host2 "tail -2 /tmp/protect-rp.log" || true

lab_step "power loss of host2"
last2=$(grep -o 'kemari-guest alive [0-9]*' "$f2" | tail -1 | awk '{print $3}')
lab_kill host2
acked2=$({ grep -o 'kemari-disk wrote [0-9]*' "$f2" || true; } | tail -1 | awk '{print $3}')
lab_say "host2's guest printed 'alive $last2' and 'wrote ${acked2:-none}' last"

lab_step "host1 fails over"
rj=
for _ in $(seq 180); do
  rj=$(lab_run host1 "head -1 /var/lib/kemari/receive-rp.json" 30) || true
  [ -n "$rj" ] && break
  sleep 1
done
lab_run host1 "cat /var/lib/kemari/receive-rp.log" || true
[ -n "$rj" ] || lab_fail "host1's kemari receive did not finish within 180 s of host2's loss"
read -r fo2 ms2 seq2 < <(echo "$rj" | python3 -c '
import json, sys
f = json.load(sys.stdin).get("failover")
print("no 0 -1" if not f else "yes %d %d" % (round(f["heartbeat_to_running_ms"]), f["report"]["seq"]))')
[ "$fo2" = yes ] || lab_fail "no failover to host1: $rj"
lab_figure second_failover_ms "$ms2"
lab_figure second_failover_seq "$seq2"
c1=$(lab_guest_console_file host1 "$name")
lab_wait_console host1 "$name" 'kemari-guest alive [0-9]+' 90 || lab_fail "the guest's console heartbeat did not resume on host1"
first1=$(grep -o 'kemari-guest alive [0-9]*' "$c1" | head -1 | awk '{print $3}')
lab_wait_console host1 "$name" "kemari-guest alive $((first1 + 2))([^0-9]|\$)" 60 || lab_fail "the guest stopped on host1 after 'alive $first1'"
lab_say "console heartbeat: host2 last 'alive $last2', host1 first 'alive $first1'"
[ "$first1" -le $((last2 + 1)) ] && [ "$first1" -ge $((last2 - 3)) ] || lab_fail "host1 resumed at 'alive $first1', host2 was at $last2"
lab_wait_console host1 "$name" 'kemari-disk wrote [0-9]+' 90 || lab_fail "the disk writer did not go on on host1"
lab_guest_live host1 "$name" || lab_fail "$name is not running on host1"

lab_step "the disk on host1: every record acknowledged in both lives is there"
[ -n "$acked2" ] || lab_fail "host2's guest reported no disk write"
sleep 3
lab_run host1 "xl destroy $name"
dj=
for _ in $(seq 60); do
  dj=$(lab_run host1 "sed -n 2p /var/lib/kemari/receive-rp.json" 30) || true
  [ -n "$dj" ] && break
  sleep 1
done
echo "host1 disk: $dj"
lab_copy_out host1 "$RP_COPY" "$LAB_RUN/reprotect-copy.img"
read -r acked lost last_rec < <(python3 - "$LAB_RUN/reprotect-copy.img" "$acked2" <<'PY'
import hashlib, sys
img = open(sys.argv[1], "rb").read()
n = int(sys.argv[2])
def rec(i):
    s = img[i * 512:(i + 1) * 512].rstrip(b"\0").decode(errors="replace")
    return s == "kemari-rec %d %s\n" % (i, hashlib.sha1(b"rec %d\n" % i).hexdigest())
lost = [i for i in range(n + 1) if not rec(i)]
print("lost records:", lost[:10], file=sys.stderr)
print(n + 1, len(lost), max([i for i in range(len(img) // 512) if rec(i)], default=-1))
PY
)
rm -f "$LAB_RUN/reprotect-copy.img"
lab_figure records_acked_first_life "$((life1_disk + 1))"
lab_figure records_acked_before_second_kill "$acked"
lab_figure records_lost "$lost"
lab_figure last_record_on_host1 "$last_rec"
[ "$lost" = 0 ] || lab_fail "$lost of the $acked records acknowledged before host2's loss are not on host1's disk"
[ "$last_rec" -gt "$acked2" ] || lab_fail "no record after $acked2 on host1's disk: the writer did not go on there"
lab_say "reprotect PASS: failover to host2, protected again to the rebooted host1, host2 killed: the guest runs on host1, $acked records acknowledged, $lost lost"
