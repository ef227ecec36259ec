# shellcheck shell=bash
# Scenario hosts: the lab's own host handling, as failover scenarios will use it: power loss of a
# host (lab_kill), the survivor sees it gone, the host boots again (lab_boot_host) and rejoins the
# network, and dom0 can end its own QEMU (lab-poweroff through isa-debug-exit).

lab_step "boot 2 hosts"
lab_boot_hosts 2
lab_figure boot_s "$LAB_BOOT_SECONDS"

lab_step "power loss of host2"
lab_kill host2
if lab_run host1 'ping -c 2 -W 2 10.77.0.2' >/dev/null; then lab_fail "host2 still answers after lab_kill"; fi
rc=0
lab_run host2 true || rc=$?
[ "$rc" = 125 ] || lab_fail "lab_run on a dead host returned $rc, not 125"

lab_step "host2 boots again and rejoins"
t0=$(lab_now)
lab_boot_host host2
lab_figure reboot_s "$(lab_since "$t0")"
lab_run host1 'ping -c 2 -W 5 10.77.0.2'
lab_run host2 'ping -c 2 -W 5 10.77.0.1'

lab_step "dom0 powers its host off"
lab_run host2 'lab-poweroff 0 & sleep 5' >/dev/null 2>&1 || true
for _ in $(seq 1 50); do lab_host_alive host2 || break; sleep 0.2; done
if lab_host_alive host2; then lab_fail "host2 still running after lab-poweroff"; fi
