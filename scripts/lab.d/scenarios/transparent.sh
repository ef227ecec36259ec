# shellcheck shell=bash
# Scenario transparent (experiment; in the longer list, scripts/test --full): the first step of issue 13's
# mechanism, decided in the lab (docs/failover.md section 9). A PVH guest (1 vCPU, no disk or
# NIC: its console and xenstore only) is protected with PAUSE checkpoints (never suspended) from
# host1 to host2 by `kemari replicate --checkpoints N --hold`, which leaves it paused exactly at
# the last ACK. Its PV state is read from the held primary (`kemari debug pv-capture`: ports,
# vcpu_info and FIFO frames found in its RAM), host1's copy is destroyed, and host2's replica is
# brought back in place by `kemari debug pv-resurrect` (a stub in the replica's vCPU 0 rebuilds
# the ports with their numbers, the FIFO control block, vcpu_info, upcall vector; no image, no
# xl restore). Checked from outside: host2's console log must go on with a heartbeat number
# above host1's last one, and the guest must take CPU time.
TR_N=${TR_N:-10}
TR_PORT=${TR_PORT:-7100}
name=tr-pvh
spool=/var/lib/kemari/spool-tr

lab_step "boot 2 hosts"
lab_boot_hosts 2

lab_step "create a PVH guest on host1"
lab_create_guest host1 pvh "$name" mem=128
lab_wait_console host1 "$name" 'kemari-guest alive 3' 180 || lab_fail "guest did not come up"

lab_step "kemari receive on host2"
lab_run host2 "mkdir -p /var/lib/kemari && rm -rf $spool"
lab_run host2 "setsid sh -c 'kemari --json receive --listen 0.0.0.0:$TR_PORT --spool-dir $spool --once >/var/lib/kemari/receive-tr.json 2>/var/lib/kemari/receive-tr.log' </dev/null >/dev/null 2>&1 &"
sleep 2

lab_step "kemari replicate (pause checkpoints) --checkpoints $TR_N --hold"
if ! lab_run host1 "kemari --json replicate $name $(lab_host_ip host2):$TR_PORT --checkpoints $TR_N --interval-ms 200 --hold 2>/tmp/replicate-tr.log" 1200 >"$LAB_RUN/tr-replicate.json"; then
  lab_run host1 "cat /tmp/replicate-tr.log" || true
  lab_fail "kemari replicate failed"
fi
rjson=
for _ in $(seq 60); do
  rjson=$(lab_run host2 "cat /var/lib/kemari/receive-tr.json" 30) || true
  [ -n "$rjson" ] && break
  sleep 1
done
echo "$rjson" >"$LAB_RUN/tr-receive.json"
replica=$(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(r["replica"])' "$rjson") || lab_fail "receiver: $rjson"

lab_step "PV state of the held primary"
if ! lab_run host1 "kemari debug pv-capture $name" 300 >"$LAB_RUN/tr-pv.json"; then
  lab_fail "pv-capture failed"
fi
cat "$LAB_RUN/tr-pv.json" >&2
f1=$(lab_guest_console_file host1 "$name")
last=$(grep -aoE 'kemari-guest alive [0-9]+' "$f1" | tail -1 | awk '{print $3}')
lab_say "host1's last heartbeat: alive $last"
lab_run host1 "xl destroy $name"

lab_step "pv-resurrect the replica (domain $replica) on host2"
lab_copy_in host2 "$LAB_RUN/tr-pv.json" /tmp/pv.json
lab_run host2 "xl list"
t0=$(lab_now)
if ! lab_run host2 "kemari debug pv-resurrect $replica --pv /tmp/pv.json --staged $spool/staged.kemari" 120 >"$LAB_RUN/tr-resurrect.json"; then
  lab_run host2 "xl list; xl dmesg | tail -30" || true
  lab_fail "pv-resurrect failed"
fi
cat "$LAB_RUN/tr-resurrect.json" >&2
lab_figure resurrect_s "$(lab_since "$t0")"

lab_step "the guest runs on on host2"
f2=$(lab_guest_console_file host2 "$name")
want=$((last + 5))
ok=0
for _ in $(seq 120); do
  n=$( (grep -aoE 'kemari-guest alive [0-9]+' "$f2" 2>/dev/null || true) | tail -1 | awk '{print $3}')
  if [ -n "$n" ] && [ "$n" -ge "$want" ]; then ok=1; break; fi
  sleep 1
done
lab_run host2 "xl list; xl dmesg | tail -20" || true
tail -20 "$f2" >&2 2>/dev/null || true
lab_figure host1_last "$last"
lab_figure host2_last "${n:-none}"
[ "$ok" = 1 ] || lab_fail "host2's console did not reach alive $want (last: ${n:-none})"
lab_say "PASS: the guest went on from alive $last to alive $n on host2, transparently"
