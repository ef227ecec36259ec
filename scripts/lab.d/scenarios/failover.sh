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
#   FO_GUEST=pvh|hvm|hvm-nopv guest type (default pvh; hvm-nopv: HVM without any PV interface,
#                             console on the emulated UART, needs FO_QUIESCE=pause FO_DISK=0)
#   FO_CON=tty|kmsg           the guest's console lines through its console tty (default) or the
#                             kernel log (lab.con=kmsg: printed by the polled console driver)
#   FO_QUIESCE=suspend|pause  checkpoints at a cooperative suspend point (--suspend) or a pause
#   FO_METHOD=restore|in-place  how host2 resumes (kemari receive --failover-method)
#   FO_HB_MS, FO_HB_MISSES    heartbeat period and misses (default 500 ms x 6: TCG is slow)
#   FO_INTERVAL_MS            maximum epoch (default 500)
#   FO_PROTECT_S              seconds of protection before the kill (default 15)
#   FO_KILL=host1|host2|replicate  whose power fails (host2: the primary must go on
#                             unprotected); replicate: only host1's `kemari replicate` is
#                             SIGKILLed, host1 lives: its fence guard must pause/destroy the guest
#                             before host2 declares the primary dead and resumes it (split-brain
#                             guard, docs/failover.md); figures fence_seen_s, primary_dead_seen_s,
#                             fence_lead_s (from the hosts' clocks)
#   FO_KILL_AT=random|initial-sync|mid-checkpoint|between-ack-and-release|idle
#                             when host1 dies (default random: after FO_PROTECT_S s of
#                             protection). The others set KEMARI_DEBUG_FAILPOINT in kemari
#                             replicate, which holds that point open (kemarid::failover::failpoint)
#                             and writes a marker to host1's /share; the scenario kills host1
#                             inside the window and prints the point it hit (figure kill_point).
#                             initial-sync: host2 must refuse to fail over (no consistent replica:
#                             the guest is lost with host1) and start nothing.
#   FO_KILL_SEQ               the checkpoint at which the window opens (default 10)
#   FO_DISK=0|1               the guest's disk under output commit (default 1): created paused
#                             without a disk, `kemari replicate --disk IMG --unpause` serves it on
#                             host1, `kemari receive --disk COPY` keeps host2's copy (made before
#                             the start) at the last ACK and serves it after the failover; the
#                             guest's disk writer prints "kemari-disk wrote N" after each fsync'd
#                             record N. Checks: every record host1's console reported written
#                             before the kill is on host2's copy (lost=0), and the writer goes on
#                             on host2 (new lines on its console).
#                             With --suspend the writes of an epoch are released when its
#                             checkpoint's suspend is requested (a task waiting for a write held
#                             until the ACK cannot be frozen, the suspend would fail: run
#                             20261130-231528); records host1 printed after the last ACK are
#                             rolled back and written again by the guest on host2 (figure
#                             disk_writes_redone_on_host2), docs/failover.md.
#   FO_TCP=0|1                a TCP session across the failover (default: FO_DISK; needs FO_DISK=1):
#                             the guest's NIC is Kemari's netback under output commit on host1
#                             (`kemari replicate --vif bridge=xenbr0,mac=$FO_MAC`: its frames
#                             leave only after the ACK of their checkpoint) and on host2 after
#                             the failover (`kemari receive --vif ...`: netfront reconnects, the
#                             MAC is announced by RARP, the guest's arp_notify sends a gratuitous
#                             ARP); address $FO_GUEST_IP. A client in host2's dom0 keeps one nc
#                             connection to its echo service (port 7000), a line every 0.5 s.
#                             PASS needs tcp_session_survived=yes: the SAME connection (same nc
#                             process, one kemari-count greeting) echoes lines sent after the
#                             failover was complete.

# FO_VIA=direct|xl: how protection starts (default direct: `kemari receive` and `kemari replicate`
# run in the foreground). xl: kemarid on both hosts, run directly (the lab's dom0s have no
# systemd), protection started with `xl kemari start NAME HOST2` through the installed xl wrapper
# and observed with `xl kemari status --json`, the Python client and `xl kemari events`
# (scripts/lab.d/operator.sh, docs/install.md); needs FO_TCP=0 and FO_METHOD=restore (kemarid's
# workers serve no NIC on the primary and resume by restore).
FO_VIA=${FO_VIA:-direct}
if [ "$FO_VIA" = xl ]; then source "$LAB_DIR/operator.sh"; fi
FO_GUEST=${FO_GUEST:-pvh}
FO_QUIESCE=${FO_QUIESCE:-suspend}
FO_METHOD=${FO_METHOD:-restore}
FO_HB_MS=${FO_HB_MS:-500}
FO_HB_MISSES=${FO_HB_MISSES:-6}
FO_INTERVAL_MS=${FO_INTERVAL_MS:-500}
FO_PROTECT_S=${FO_PROTECT_S:-15}
FO_KILL=${FO_KILL:-host1}
FO_KILL_AT=${FO_KILL_AT:-random}
FO_KILL_SEQ=${FO_KILL_SEQ:-10}
case "$FO_KILL_AT" in
  random | initial-sync | mid-checkpoint | between-ack-and-release | idle) ;;
  *) lab_fail "FO_KILL_AT=$FO_KILL_AT: expected random, initial-sync, mid-checkpoint, between-ack-and-release or idle" ;;
esac
fo_marker="$(lab_host_dir host1)/share/failpoint"
FO_PORT=${FO_PORT:-7300}
FO_HB_PORT=${FO_HB_PORT:-7301}
FO_DISK=${FO_DISK:-1}
FO_TCP=${FO_TCP:-$FO_DISK}
FO_GUEST_IP=10.77.0.150
FO_IMG=/var/lib/lab/fo.img
FO_COPY=/var/lib/lab/fo-copy.img
FO_MAC=00:16:3e:77:00:96
netopt=""
# no vif in the guest's xl config: kemari replicate --vif serves it (and kemari receive --vif
# after the failover)
[ "$FO_TCP" = 1 ] && netopt="ip=$FO_GUEST_IP/24"
[ "$FO_GUEST" = hvm-nopv ] && { [ "$FO_QUIESCE" != pause ] || [ "$FO_DISK" = 1 ]; } &&
  lab_fail "FO_GUEST=hvm-nopv needs FO_QUIESCE=pause and FO_DISK=0: without PV drivers the guest cannot suspend, and neither our blkback nor our netback can serve it"
[ "$FO_TCP" = 1 ] && [ "$FO_DISK" != 1 ] && lab_fail "FO_TCP=1 needs FO_DISK=1 (the guest is created paused for kemari replicate --vif --unpause)"
name=fo-$FO_GUEST
lab_say "failover: guest $FO_GUEST, checkpoints by $FO_QUIESCE, resume by $FO_METHOD, heartbeat ${FO_HB_MS} ms x $FO_HB_MISSES"
lab_figure guest "$FO_GUEST"
lab_figure quiesce "$FO_QUIESCE"
lab_figure method "$FO_METHOD"
lab_figure heartbeat_period_ms "$FO_HB_MS"
lab_figure heartbeat_misses "$FO_HB_MISSES"
lab_figure disk "$FO_DISK"

lab_step "boot 2 hosts"
lab_boot_hosts 2

rflags="" pflags=""
if [ "$FO_DISK" = 1 ]; then
  lab_step "16 MiB disk image on host1, the same on host2"
  lab_run host1 "mkdir -p /var/lib/lab /run/kemari && rm -f $FO_IMG && truncate -s 16M $FO_IMG && sha1sum $FO_IMG"
  lab_run host2 "mkdir -p /var/lib/lab /run/kemari && rm -f $FO_COPY && truncate -s 16M $FO_COPY && sha1sum $FO_COPY"
  p=$(lab_run host1 "sha1sum $FO_IMG" | cut -c1-40)
  c=$(lab_run host2 "sha1sum $FO_COPY" | cut -c1-40)
  [ "$p" = "$c" ] || lab_fail "host2's copy differs from host1's image before the start"
  lab_step "create a $FO_GUEST guest, paused and without a disk, on host1"
  # shellcheck disable=SC2086 # netopt: zero or two options
  lab_create_guest host1 "$FO_GUEST" "$name" "mem=128" "paused=1" $netopt "extra=lab.memwrite=256${FO_CON:+ lab.con=$FO_CON}"
  rflags="--disk $FO_COPY"
  pflags="--disk $FO_IMG --unpause"
else
  lab_step "create a $FO_GUEST guest with a memory writer on host1"
  # shellcheck disable=SC2086
  lab_create_guest host1 "$FO_GUEST" "$name" "mem=128" $netopt "extra=lab.memwrite=256${FO_CON:+ lab.con=$FO_CON}"
  lab_wait_console host1 "$name" 'kemari-guest memory writer' 180 || lab_fail "$name did not start"
fi

if [ "$FO_GUEST" = hvm-nopv ]; then
  lab_step "kemari replicate --suspend refuses the guest without PV drivers"
  out=$(lab_run host1 "kemari replicate $name 127.0.0.1:9 --suspend 2>&1; echo exit=\$?" 60) || true
  echo "$out" >&2
  echo "$out" | grep -q 'exit=1' && echo "$out" | grep -q 'without PV drivers' ||
    lab_fail "kemari replicate --suspend did not refuse the HVM guest without PV drivers"
fi

if [ "$FO_TCP" = 1 ]; then
  rflags="$rflags --vif bridge=xenbr0,mac=$FO_MAC"
  pflags="$pflags --vif bridge=xenbr0,mac=$FO_MAC"
fi

if [ "$FO_VIA" != xl ]; then
lab_step "kemari receive --failover on host2"
# the guest's console log of an earlier failover to host2 in this run (failpoints, reprotect)
c2=$(lab_guest_console_file host2 "$name")
[ -e "$c2" ] && mv "$c2" "${c2%.log}.$(date +%H%M%S).log"
lab_run host2 "mkdir -p /var/lib/kemari && rm -rf /var/lib/kemari/spool-*"
lab_run host2 "setsid sh -c 'echo \$\$ >/var/lib/kemari/receive-fo.pid; RUST_LOG=info exec kemari --json receive --listen 0.0.0.0:$FO_PORT --spool-dir /var/lib/kemari/spool-fo --once --heartbeat-listen 0.0.0.0:$FO_HB_PORT --heartbeat-ms $FO_HB_MS --heartbeat-misses $FO_HB_MISSES --failover --failover-method $FO_METHOD $rflags >/var/lib/kemari/receive-fo.json 2>/var/lib/kemari/receive-fo.log' </dev/null >/dev/null 2>&1 &"
sleep 2
fi

lab_step "kemari replicate on host1 (heartbeat, checkpoints by $FO_QUIESCE)"
qflag=""
# 120 s: the first suspend request comes right after the unpause of a guest created paused, which
# answers it only once booted (its frontends connected) - over 30 s on a loaded machine (runs
# 20261201-032700, first try of -030456's points)
[ "$FO_QUIESCE" = suspend ] && qflag="--suspend --suspend-timeout-s 120"
fpenv=""
if [ "$FO_KILL_AT" != random ]; then
  rm -f "$fo_marker"
  fpenv="KEMARI_DEBUG_FAILPOINT=$FO_KILL_AT KEMARI_DEBUG_FAILPOINT_MS=120000 KEMARI_DEBUG_FAILPOINT_SEQ=$FO_KILL_SEQ KEMARI_DEBUG_FAILPOINT_FILE=/share/failpoint"
fi
lab_figure kill_at "$FO_KILL_AT"
lab_figure via "$FO_VIA"
if [ "$FO_VIA" = xl ]; then op_fo_start "$name" "$rflags" "$pflags" "$fpenv"; else
lab_run host1 "setsid sh -c '$fpenv RUST_LOG=info kemari replicate $name $(lab_host_ip host2):$FO_PORT --interval-ms $FO_INTERVAL_MS --ack-timeout-s 60 $qflag --heartbeat-port $FO_HB_PORT --heartbeat-ms $FO_HB_MS --heartbeat-misses $FO_HB_MISSES $pflags >/tmp/replicate-fo.out 2>/tmp/replicate-fo.log & echo \$! >/tmp/replicate-fo.pid' </dev/null >/dev/null 2>&1"
fi
# fo_wait_marker: wait (up to 240 s) for kemari replicate's failpoint marker; prints it
fo_wait_marker() {
  local _
  for _ in $(seq 1200); do
    [ -s "$fo_marker" ] && { cat "$fo_marker"; return 0; }
    lab_run host1 'kill -0 "$(cat /tmp/replicate-fo.pid)" 2>/dev/null' 30 || break
    sleep 0.2
  done
  lab_run host1 "tail -5 /tmp/replicate-fo.log" || true
  lab_fail "kemari replicate never reached the kill point $FO_KILL_AT"
}
if [ "$FO_KILL_AT" = initial-sync ]; then
  lab_step "power loss of host1 during the initial sync"
  hit=$(fo_wait_marker)
  lab_kill host1
  lab_figure kill_point "${hit// /_}"
  lab_say "host1 killed at: $hit"
  rjson=
  for _ in $(seq 120); do
    rjson=$(lab_run host2 "head -1 /var/lib/kemari/receive-fo.json" 30) || true
    [ -n "$rjson" ] && break
    sleep 1
  done
  lab_run host2 "cat /var/lib/kemari/receive-fo.log"
  [ -n "$rjson" ] || lab_fail "kemari receive did not end within 120 s of the kill"
  echo "$rjson"
  echo "$rjson" | python3 -c 'import json,sys; r=json.load(sys.stdin); sys.exit(0 if r.get("failover") is None and r.get("acked") is None else 1)' ||
    lab_fail "host2 claims a failover or an ACKed state after a kill during the initial sync: $rjson"
  lab_run host2 "grep -q 'REFUSING FAILOVER' /var/lib/kemari/receive-fo.log" ||
    lab_fail "host2 did not refuse the failover clearly"
  lab_run host2 '! kill -0 "$(cat /var/lib/kemari/receive-fo.pid)" 2>/dev/null' 30 ||
    lab_fail "kemari receive still runs after refusing"
  doms=$(lab_run host2 "xl list | awk 'NR > 2' | wc -l" 30)
  [ "$doms" = 0 ] || { lab_run host2 "xl list" || true; lab_fail "host2 runs $doms domains after refusing (a half-built replica?)"; }
  lab_figure host2_domains_after "$doms"
  lab_say "initial-sync kill PASS: host2 refused (no consistent replica), started nothing; the guest is lost with host1"
  return 0
fi
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
if [ "$FO_VIA" = xl ]; then op_fo_observe_protected "$name"; fi
if [ "$FO_DISK" = 1 ]; then
  lab_wait_console host1 "$name" 'kemari-disk wrote [0-9]+' 180 || {
    lab_run host1 "tail -20 /tmp/replicate-fo.log" || true
    lab_fail "the guest's disk writer did not start under protection"
  }
fi

f1=$(lab_guest_console_file host1 "$name")
if [ "$FO_TCP" = 1 ]; then
  lab_step "a TCP session from host2's dom0 to the guest's echo service"
  lab_wait_console host1 "$name" 'kemari-guest tcp service' 120 || lab_fail "the guest's TCP service did not start"
  # the guest's ARP replies are frames under output commit too: on loaded hosts a suspend
  # checkpoint can take longer than dom0's 3 ARP probes, so resolve the address first
  lab_run host2 "for i in \$(seq 30); do ping -c 1 -W 10 $FO_GUEST_IP >/dev/null 2>&1 && exit 0; done; exit 1" 400 ||
    lab_fail "the guest at $FO_GUEST_IP does not answer ping from host2"
  lab_run host2 "rm -f /tmp/tcp-fo.out; setsid sh -c '(i=0; while :; do echo fo-line-\$i; echo \$i >/tmp/tcp-fo.sent; i=\$((i + 1)); sleep 0.5; done) | nc $FO_GUEST_IP 7000 >/tmp/tcp-fo.out 2>/tmp/tcp-fo.err & echo \$! >/tmp/tcp-fo.pid' </dev/null >/dev/null 2>&1"
  ok=0
  for _ in $(seq 60); do
    n=$(lab_run host2 "grep -c fo-line- /tmp/tcp-fo.out" 30) || true
    [ "${n:-0}" -ge 3 ] && { ok=1; break; }
    sleep 1
  done
  [ "$ok" = 1 ] || { lab_run host2 "cat /tmp/tcp-fo.out /tmp/tcp-fo.err" || true; lab_fail "no echo from the guest's TCP service at $FO_GUEST_IP:7000"; }
  lab_run host2 "head -3 /tmp/tcp-fo.out"
fi

if [ "$FO_KILL_AT" = random ]; then
  lab_step "protected for ${FO_PROTECT_S} s"
  sleep "$FO_PROTECT_S"
else
  lab_step "protected until kemari replicate holds $FO_KILL_AT open (from checkpoint $FO_KILL_SEQ)"
  hit=$(fo_wait_marker)
fi
lab_run host1 "tail -3 /tmp/replicate-fo.log" || true
lab_run host1 "xl list $name" || true
# protection must still be on, or there is nothing to fail over to (e.g. a suspend the guest
# could not do)
if ! lab_run host1 'kill -0 "$(cat /tmp/replicate-fo.pid)" 2>/dev/null' 30; then
  lab_run host1 "grep -iE 'suspend|LOST|error' /tmp/replicate-fo.log | tail -8" || true
  grep -E 'Freezing of tasks failed|freeze processes failed' "$f1" >&2 || true
  lab_fail "protection ended before the kill (kemari replicate exited; see its log above)"
fi

if [ "$FO_KILL" = host2 ]; then
  lab_step "power loss of host2, the secondary (SIGKILL of its QEMU)"
  t0=$(lab_now)
  lab_kill host2
  gone=0
  for _ in $(seq 120); do
    if ! lab_run host1 'kill -0 "$(cat /tmp/replicate-fo.pid)" 2>/dev/null' 30; then gone=1; break; fi
    # with the disk, kemari replicate goes on serving it to the unprotected guest
    if [ "$FO_DISK" = 1 ] && lab_run host1 "grep -q 'protection over' /tmp/replicate-fo.log" 30; then gone=1; break; fi
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

if [ "$FO_KILL" = replicate ]; then
  lab_step "SIGKILL of host1's kemari replicate only (host1 lives)"
else
  lab_step "power loss of host1 (SIGKILL of its QEMU)"
fi
last1=$(grep -o 'kemari-guest alive [0-9]*' "$f1" | tail -1 | awk '{print $3}')
t0=$(lab_now)
if [ "$FO_KILL" = replicate ]; then
  lab_run host1 'kill -KILL "$(cat /tmp/replicate-fo.pid)"' 30
  # the fence guard must stop the guest on host1 before host2 declares the primary dead
  t_fence= t_dead=
  for _ in $(seq 300); do
    if [ -z "$t_fence" ]; then
      st=$(lab_run host1 "xl list $name 2>/dev/null | awk 'NR==2 {print \$5}'" 30) || true
      case "$st" in "" | *p*) t_fence=$(lab_since "$t0") ;; esac
    fi
    if [ -z "$t_dead" ] && lab_run host2 "grep -q 'primary .* is dead' /var/lib/kemari/receive-fo.log" 30; then
      t_dead=$(lab_since "$t0")
      # at the very moment host2 has declared host1 dead, the guest there must be stopped
      st=$(lab_run host1 "xl list $name 2>/dev/null | awk 'NR==2 {print \$5}'" 30) || true
      case "$st" in "" | *p*) ;; *) lab_fail "host2 declared the primary dead while host1's guest still runs (state $st): split-brain" ;; esac
      [ -n "$t_fence" ] || t_fence=$t_dead
    fi
    [ -n "$t_fence" ] && [ -n "$t_dead" ] && break
    sleep 0.2
  done
  lab_run host1 "grep 'kemari fence' /tmp/replicate-fo.log" || lab_fail "no fence guard line in host1's log"
  lab_run host2 "grep 'is dead' /var/lib/kemari/receive-fo.log" || true
  [ -n "$t_fence" ] || lab_fail "host1's guest was not paused or destroyed within 60 s of kemari replicate's death"
  [ -n "$t_dead" ] || lab_fail "host2 did not declare the primary dead within 60 s"
  lab_figure fence_seen_s "$t_fence"
  lab_figure primary_dead_seen_s "$t_dead"
  awk -v f="$t_fence" -v d="$t_dead" 'BEGIN { exit !(f <= d) }' || lab_fail "host2 declared the primary dead ($t_dead s) before host1's guest was fenced ($t_fence s)"
  # the same order on the hosts' own clocks: the guard's PAUSED time (host1's clock) against
  # host2's "is dead" time (host2's clock), each mapped to this machine's clock by the host's
  # offset measured here (to within half a lab_run round trip)
  fo_offset() {
    local a t b
    a=$(lab_now)
    t=$(lab_run "$1" 'date +%s.%N' 30)
    b=$(lab_now)
    awk -v a="$a" -v t="$t" -v b="$b" 'BEGIN { printf "%.3f %.3f\n", t - (a + b) / 2, (b - a) / 2 }'
  }
  read -r off1 err1 < <(fo_offset host1)
  read -r off2 err2 < <(fo_offset host2)
  fence_unix=$(lab_run host1 "sed -n 's/.*PAUSED at \([0-9.]*\) .*/\1/p' /tmp/replicate-fo.log" 30 | head -1)
  dead_unix=$(lab_run host2 "sed -n 's/.*is dead.* at \([0-9.]*\) (unix time).*/\1/p' /var/lib/kemari/receive-fo.log" 30 | head -1)
  [ -n "$fence_unix" ] && [ -n "$dead_unix" ] || lab_fail "no PAUSED time on host1 or no dead time on host2"
  lead=$(awk -v f="$fence_unix" -v o1="$off1" -v d="$dead_unix" -v o2="$off2" 'BEGIN { printf "%.3f", (d - o2) - (f - o1) }')
  lab_figure fence_lead_s "$lead"
  lab_figure clock_uncertainty_s "$(awk -v a="$err1" -v b="$err2" 'BEGIN { printf "%.3f", a + b }')"
  lab_say "host1's guest paused at $fence_unix (host1), host2 declared it dead at $dead_unix (host2); clock offsets $off1, $off2 s: the fence came $lead s earlier (+- $err1 + $err2 s)"
  awk -v l="$lead" 'BEGIN { exit !(l > 0) }' || lab_fail "host2 declared the primary dead $lead s before host1's guest was paused"
  lab_say "fencing: host1's guest stopped ${t_fence} s after kemari replicate's SIGKILL, host2 declared the primary dead at ${t_dead} s"
else
  if [ "$FO_KILL_AT" != random ]; then
    # the window is held open for 120 s: the kill lands inside it
    hit=$(cat "$fo_marker")
    lab_figure kill_point "${hit// /_}"
  fi
  lab_kill host1
  [ "$FO_KILL_AT" = random ] || lab_say "host1 killed at: $hit"
fi
last1_after=$(grep -o 'kemari-guest alive [0-9]*' "$f1" | tail -1 | awk '{print $3}')
# every write the guest saw acknowledged (fsync returned) before the kill, as host1's console says
acked_disk=
[ "$FO_DISK" = 1 ] && acked_disk=$({ grep -o 'kemari-disk wrote [0-9]*' "$f1" || true; } | tail -1 | awk '{print $3}')
lab_say "host1's guest printed 'alive ${last1_after:-none}' last (${last1:-none} just before the kill)"
lab_figure counter_at_kill "${last1_after:-0}"

tcp_before=0
[ "$FO_TCP" = 1 ] && tcp_before=$(lab_run host2 "grep -c fo-line- /tmp/tcp-fo.out" 30 || echo 0)

lab_step "host2 fails over"
rjson=
for _ in $(seq 180); do
  rjson=$(lab_run host2 "head -1 /var/lib/kemari/receive-fo.json" 30) || true
  [ -n "$rjson" ] && break
  sleep 1
done
seen_s=$(lab_since "$t0")
# the last line the client had sent when host2's failover was complete
[ "$FO_TCP" = 1 ] && tcp_sent_at_failover=$(lab_run host2 "cat /tmp/tcp-fo.sent" 30 || echo 0)
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
# Evidence either way: CPU time and the vCPU's rip twice, 5 s apart, the pages the guest's
# memory writer dirties (log-dirty, 3 x 1 s) and the console's tail.
for i in 1 2; do
  lab_run host2 "xl list -v $name 2>/dev/null | tail -1; kemari debug cpu-context $name 2>&1 | head -2" || true
  [ "$i" = 1 ] && sleep 5
done
lab_run host2 "kemari debug log-dirty $name --rounds 3 --interval-ms 1000" 60 || true
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
if [ "$FO_VIA" = xl ]; then op_fo_observe_failover "$name"; fi
if [ "$FO_TCP" = 1 ]; then
  lab_step "the TCP session across the failover"
  # survived: a line sent after the failover was complete comes back on the same connection
  # (the nc process still runs, the guest greeted it once); TCP's retransmission backoff
  # after the outage can take tens of seconds
  survived=no tcp_after=$tcp_before last_echo=-1
  t_tcp=$(lab_now)
  for _ in $(seq 90); do
    tcp_after=$(lab_run host2 "grep -c fo-line- /tmp/tcp-fo.out" 30) || tcp_after=$tcp_before
    last_echo=$(lab_run host2 "grep -o 'fo-line-[0-9]*' /tmp/tcp-fo.out | tail -1 | cut -d- -f3" 30) || last_echo=-1
    if [ "${last_echo:--1}" -gt "${tcp_sent_at_failover:-0}" ] && lab_run host2 'kill -0 "$(cat /tmp/tcp-fo.pid)" 2>/dev/null' 30; then
      [ "$(lab_run host2 "grep -c kemari-count /tmp/tcp-fo.out" 30)" = 1 ] && survived=yes
      break
    fi
    sleep 1
  done
  lab_figure tcp_failover_to_echo_s "$(lab_since "$t_tcp")"
  lab_figure tcp_line_sent_at_failover "${tcp_sent_at_failover:-0}"
  lab_figure tcp_last_line_echoed "$last_echo"
  lab_run host2 "tail -3 /tmp/tcp-fo.out; cat /tmp/tcp-fo.err; kill \$(cat /tmp/tcp-fo.pid) 2>/dev/null" || true
  lab_figure tcp_echoes_before_kill "$tcp_before"
  lab_figure tcp_echoes_at_end "$tcp_after"
  lab_figure tcp_session_survived "$survived"
  # a new connection tells a guest unreachable on host2 from a session whose state diverged
  newc=no
  lab_run host2 "printf 'fo-new\\n' | nc -w 10 $FO_GUEST_IP 7000" 60 | grep -q fo-new && newc=yes
  lab_figure tcp_new_connection_after "$newc"
  if [ "$newc" = no ]; then
    # evidence for the guest's network on host2: its vif, the bridge, where the bridge and
    # dom0 think its MAC/address are
    lab_run host2 "xenstore-ls /local/domain/0/backend/kemari-vif 2>/dev/null | grep -E 'state|mac'; ip link | grep -E 'vif|xenbr'; bridge fdb show br xenbr0 2>/dev/null | grep -v permanent | head; ip neigh show $FO_GUEST_IP; ping -c 2 -W 2 $FO_GUEST_IP | tail -2" 60 || true
  fi
  lab_say "TCP session: $tcp_before echoes before the kill, $tcp_after at the end, line ${tcp_sent_at_failover:-?} sent at the failover, $last_echo echoed last: survived=$survived; a new connection after the failover: $newc"
  lab_run host2 "grep -E 'vif|announced' /var/lib/kemari/receive-fo.log | tail -5" || true
  [ "$survived" = yes ] || lab_fail "the TCP session did not survive the failover (line ${tcp_sent_at_failover:-?} sent at the failover, $last_echo echoed last)"
fi
# FO_KEEP_GUEST=1 (scenario reprotect): the guest stays on host2, its disk served there; the
# records are checked at the end of reprotect instead
if [ "$FO_DISK" = 1 ] && [ "${FO_KEEP_GUEST:-0}" = 0 ]; then
  lab_step "the disk on host2: the writer goes on, every acknowledged record is there"
  [ -n "$acked_disk" ] || lab_fail "host1's guest reported no disk write before the kill"
  lab_figure disk_records_acked_before_kill "$((acked_disk + 1))"
  lab_wait_console host2 "$name" 'kemari-disk wrote [0-9]+' 90 || lab_fail "the guest's disk writer did not go on on host2"
  first_d2=$(grep -o 'kemari-disk wrote [0-9]*' "$f2" | head -1 | awk '{print $3}')
  lab_wait_console host2 "$name" "kemari-disk wrote $((first_d2 + 3))([^0-9]|\$)" 60 ||
    lab_fail "the disk writer printed 'wrote $first_d2' on host2, then stopped"
  lab_say "disk writer: host1 last 'wrote $acked_disk' before the kill, host2 first 'wrote $first_d2', then $((first_d2 + 3))"
  lab_figure disk_first_on_host2 "$first_d2"
  # acknowledged on host1 after the last ACKed checkpoint: rolled back, written again on host2
  lab_figure disk_writes_redone_on_host2 "$((acked_disk >= first_d2 ? acked_disk - first_d2 + 1 : 0))"
  # destroy the guest: kemari receive then stops serving the disk and prints its counters
  lab_run host2 "xl destroy $name"
  dj=
  for _ in $(seq 60); do
    dj=$(lab_run host2 "sed -n 2p /var/lib/kemari/receive-fo.json" 30) || true
    [ -n "$dj" ] && break
    sleep 1
  done
  lab_run host2 "tail -5 /var/lib/kemari/receive-fo.log" || true
  echo "host2 disk: $dj"
  [ -n "$dj" ] || lab_fail "kemari receive did not end its disk service after the guest was destroyed"
  lab_run host2 "lab-diskcheck $FO_COPY" 120 | tee "$LAB_RUN/failover-diskcheck.txt" || true
  lab_copy_out host2 "$FO_COPY" "$LAB_RUN/failover-copy.img"
  read -r acked lost last_rec derr < <(python3 - "$LAB_RUN/failover-copy.img" "$acked_disk" "$dj" <<'PY'
import hashlib, json, sys
img = open(sys.argv[1], "rb").read()
n = int(sys.argv[2])
d = json.loads(sys.argv[3])["disk"]
def rec(i):
    s = img[i * 512:(i + 1) * 512].rstrip(b"\0").decode(errors="replace")
    want = "kemari-rec %d %s\n" % (i, hashlib.sha1(b"rec %d\n" % i).hexdigest())
    return s == want
lost = [i for i in range(n + 1) if not rec(i)]
last = max([i for i in range(len(img) // 512) if rec(i)], default=-1)
print("lost records:", lost[:10], file=sys.stderr)
print(n + 1, len(lost), last, d["errors"])
PY
)
  rm -f "$LAB_RUN/failover-copy.img"
  lab_figure disk_writes_acknowledged "$acked"
  lab_figure disk_writes_lost "$lost"
  lab_figure disk_last_record_on_host2 "$last_rec"
  [ "$lost" = 0 ] || lab_fail "$lost of the $acked records acknowledged on host1 before the kill are not on host2's disk"
  [ "$last_rec" -gt "$acked_disk" ] || lab_fail "no record after $acked_disk on host2's disk: the writer did not go on there"
  [ "$derr" = 0 ] || lab_fail "host2's disk reported $derr errors"
  lab_say "disk PASS: $acked records acknowledged before the kill, $lost lost, host2 went on to record $last_rec"
fi
lab_say "failover PASS: $FO_GUEST guest continued on host2 ${hb_ms} ms after host1's last heartbeat (checkpoints before the kill: $checkpoints, last seq $last_seq)"
