# shellcheck shell=bash
# Scenario hostile: misbehaving frontends in a guest against Kemari's blkback and netback (issue
# 5's acceptance). A victim PVH guest gets its disk and NIC from `kemari attach` (--disk, --vif
# in xenbr0) and runs the disk writer (checksummed records, each written with fsync). A second
# PVH guest boots with lab.hostile=blk:51728,vif:0: its kernel binds no xenbus device
# (drivers_autoprobe 0) and tests/hostile-frontend's program (kemari-hostile, a static binary in
# an initramfs appended to guest.cpio) waits for the vbd and the vif that dom0 hot-plugs with one
# `kemari attach --vdev xvdb --disk ... --vif`. For each device in turn the program connects like
# blkfront/netfront, queues garbage requests (blk: unknown operations, segment counts, sectors past
# the end, grants it never gave or revoked, a read into a read-only grant, bad indirect requests;
# vif: TX slots leaving their page, runts, slots longer than their packet, bad grants) between
# valid ones, kicks 2,000 times with nothing queued, then moves req_prod 1,000 entries beyond the
# ring. Checks: every request answered once (garbage with an error, valid ones OKAY, a write read
# back), the overflow ends only that device (backend Closed, kemari-error, logged once, bounded
# log), `kemari attach` reports both Failed, dom0 is fine, and the victim's disk writer went on
# during and after (every record it reported written is on its disk) and its NIC answers pings.

HB=/var/lib/lab/hostile-bad.img
HDEV=51728 # xvdb
VIP=$LAB_NET_PREFIX.123

lab_step "boot 1 host"
lab_boot_hosts 1
lab_figure boot_s "$LAB_BOOT_SECONDS"
[ -s "$LAB_RUN/ro/hostile.cpio" ] || lab_fail "no hostile.cpio in the run (static build of tests/hostile-frontend missing?)"
lab_run host1 "mkdir -p /var/lib/lab && rm -f $HB /var/lib/lab/hostile-victim.img && truncate -s 32M $HB /var/lib/lab/hostile-victim.img &&
  cat /lab/guest.cpio /lab/hostile.cpio >/var/lib/lab/guest-hostile.cpio"

# kemari attach in the background in dom0; its output and then its exit status go to LOG
attach_bg() { # LOG ARGS...
  local log=$1
  shift
  lab_run host1 "RUST_LOG=info setsid sh -c 'kemari attach $*; echo \"kemari attach exit \$?\"' >$log 2>&1 </dev/null &
    for i in \$(seq 1 100); do grep -q 'kemari attach: domain\|exit' $log && break; sleep 0.2; done
    cat $log; grep -q 'kemari attach: domain' $log"
}
# victim_wrote: the last record the victim reported written
victim_wrote() {
  grep -o 'kemari-disk wrote [0-9]*' "$(lab_guest_console_file host1 hostile-victim)" | tail -1 | awk '{print $3}'
}
victim_ping() { lab_run host1 "ping -c 3 -W 5 $VIP >/dev/null" 60; }

lab_step "victim guest on kemari's blkback and netback (disk writer)"
lab_create_guest host1 pvh hostile-victim paused=1 ip="$VIP/24"
attach_bg /var/log/kemari-attach-victim.log hostile-victim --disk /var/lib/lab/hostile-victim.img --vif bridge=xenbr0 --unpause
vdom=$(lab_run host1 "xl domid hostile-victim")

lab_step "hostile guest (drivers_autoprobe 0, kemari-hostile waiting)"
lab_create_guest host1 pvh hostile-guest ramdisk=/var/lib/lab/guest-hostile.cpio extra="lab.hostile=blk:$HDEV,vif:0"
hdom=$(lab_run host1 "xl domid hostile-guest")
hlog=$(lab_guest_console_file host1 hostile-guest)
lab_wait_console host1 hostile-guest 'kemari-hostile (ready|missing|drivers)' 180
grep -q 'kemari-hostile ready' "$hlog" || lab_fail "hostile guest: $(grep -o 'kemari-hostile.*' "$hlog" | head -1)"
lab_wait_console host1 hostile-victim 'kemari-guest tcp service' 180
lab_wait_console host1 hostile-victim 'kemari-disk wrote 2' 180
for _ in 1 2 3 4 5; do victim_ping && break; sleep 2; done
victim_ping || lab_fail "the victim's NIC does not answer pings before the attack"

lab_step "hot-plug xvdb and vif 0 into the hostile guest; garbage requests and indexes"
w0=$(victim_wrote)
t0=$(lab_now)
attach_bg /var/log/kemari-attach-hostile.log hostile-guest --vdev xvdb --disk $HB --vif
lab_wait_console host1 hostile-guest 'kemari-hostile vif (done|FAIL)' 240
hostile_s=$(lab_since "$t0")
w1=$(victim_wrote)
grep -a 'kemari-hostile' "$hlog" | tr -d '\r'
for kind in blk vif; do
  line=$(grep -aoE "kemari-hostile $kind (done|FAIL).*" "$hlog" | tail -1 | tr -d '\r')
  case "$line" in *"result=ok"*) ;; *) lab_fail "hostile $kind frontend: $line" ;; esac
  fig() { echo "$line" | sed -n "s/.* $1=\([^ ]*\).*/\1/p"; }
  lab_figure "${kind}_requests" "$(fig requests)"
  lab_figure "${kind}_okay" "$(fig okay)"
  lab_figure "${kind}_error" "$(fig error)"
  [ "$kind" = blk ] && lab_figure blk_eopnotsupp "$(fig eopnotsupp)"
  lab_figure "${kind}_wrong" "$(fig wrong)"
  lab_figure "${kind}_state_after_overflow" "$(fig state_after_overflow)"
done
lab_figure hostile_phase_s "$hostile_s"

lab_step "dom0: both hostile devices ended (Closed, kemari-error), their backend alive, log bounded"
lab_run host1 "set -e
  for b in /local/domain/0/backend/kemari-vbd/$hdom/$HDEV /local/domain/0/backend/kemari-vif/$hdom/0; do
    echo \$b: state \$(xenstore-read \$b/state) kemari-state \$(xenstore-read \$b/kemari-state) error: \$(xenstore-read \$b/kemari-error)
    test \$(xenstore-read \$b/state) = 6
    xenstore-read \$b/kemari-error | grep -q .
  done
  grep -q 'broke the protocol, device closed' /var/log/kemari-attach-hostile.log
  grep -q 'broke the protocol, vif closed' /var/log/kemari-attach-hostile.log
  ! grep -q 'kemari attach exit' /var/log/kemari-attach-hostile.log" | tee "$LAB_RUN/hostile-xenstore.txt"
loglines=$(lab_run host1 "wc -l </var/log/kemari-attach-hostile.log")
warns=$(lab_run host1 "grep -c WARN /var/log/kemari-attach-hostile.log || true")
lab_figure backend_log_lines "$loglines"
lab_figure backend_warn_lines "$warns"
# per device: at most 8 bad requests at warn, one line saying the rest go to debug, the protocol error
[ "$warns" -le 20 ] || lab_fail "the hostile guest made the backend log $warns warnings"
[ "$loglines" -le 50 ] || lab_fail "the hostile guest made the backend log $loglines lines"

lab_step "the victim's disk and NIC kept working during and after"
lab_wait_console host1 hostile-victim "kemari-disk wrote $((w1 + 3))" 120
w2=$(victim_wrote)
lab_figure victim_writes_during "$((w1 - w0))"
lab_figure victim_writes_after "$((w2 - w1))"
[ "$((w1 - w0))" -ge 1 ] || lab_fail "the victim wrote nothing while the hostile guest ran ($w0 -> $w1)"
lab_check_disk host1 hostile-victim
lab_figure victim_disk_check ok
victim_ping || lab_fail "the victim's NIC does not answer pings after the attack"
lab_figure victim_ping_after ok
lab_run host1 "set -e; test \$(xenstore-read /local/domain/0/backend/kemari-vbd/$vdom/51712/state) = 4
  test \$(xenstore-read /local/domain/0/backend/kemari-vif/$vdom/0/state) = 4; xl info >/dev/null"

lab_step "guests destroyed: the hostile devices reported Failed, the victim's served with 0 errors"
lab_run host1 "set -e; xl destroy hostile-guest; xl destroy hostile-victim
  for i in \$(seq 1 50); do grep -q 'kemari attach exit' /var/log/kemari-attach-hostile.log && grep -q 'kemari attach exit' /var/log/kemari-attach-victim.log && break; sleep 0.2; done
  tail -3 /var/log/kemari-attach-hostile.log; tail -3 /var/log/kemari-attach-victim.log
  grep -q 'xvdb: Failed(' /var/log/kemari-attach-hostile.log
  grep -q 'vif 0: Failed(' /var/log/kemari-attach-hostile.log
  grep -q 'kemari attach exit 1' /var/log/kemari-attach-hostile.log
  grep -q 'xvda: Gone after.* 0 errors' /var/log/kemari-attach-victim.log
  grep -q 'vif 0: Gone after.* 0 tx errors' /var/log/kemari-attach-victim.log
  grep -q 'kemari attach exit 0' /var/log/kemari-attach-victim.log
  xenstore-ls /local/domain/0/backend/kemari-vbd/$hdom 2>/dev/null && exit 1
  xenstore-ls /local/domain/0/backend/kemari-vif/$hdom 2>/dev/null && exit 1
  xenstore-ls /local/domain/0/backend/kemari-vbd/$vdom 2>/dev/null && exit 1
  xl list"
# (reached only if the checks above held)
lab_figure hostile_attach_report Failed_exit_1
