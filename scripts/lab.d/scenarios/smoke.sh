# shellcheck shell=bash
# Scenario smoke: two hosts boot and their dom0s ping each other; the project's binaries and the
# Xen libraries they load are in dom0; a PVH guest (disk + NIC on xenbr0) and an HVM guest run on
# host1: heartbeat on their consoles, PV block/net frontends loaded, disk records written and
# found intact in dom0, and the PVH guest's TCP service answers host2's dom0 across the network.
# Sourced by scripts/lab (lab_run_scenario) in a subshell with errexit: any failing command fails
# the scenario; lab_step names the step that is reported.

lab_step "boot 2 hosts"
lab_boot_hosts 2
lab_figure boot_s "$LAB_BOOT_SECONDS"

lab_step "dom0s ping each other"
lab_run host1 "ping -c 3 -W 5 $(lab_host_ip host2)"
lab_run host2 "ping -c 3 -W 5 $(lab_host_ip host1)"

lab_step "kemari and kemarid run in dom0"
lab_run host1 'kemari --help >/dev/null && kemarid --help >/dev/null'
lab_run host1 'for l in libxenctrl.so.4.17 libxenguest.so.4.17 libxenevtchn.so.1 libxengnttab.so.1 libxenforeignmemory.so.1 libxenstore.so.4 libxentoollog.so.1 libxencall.so.1 libxendevicemodel.so.1 libxentoolcore.so.1; do [ -e /usr/lib/x86_64-linux-gnu/$l ] || { echo "missing $l"; exit 1; }; done'

lab_step "copy a file into and out of dom0"
head -c 100000 /dev/urandom >"$LAB_RUN/copy-test.bin"
lab_copy_in host2 "$LAB_RUN/copy-test.bin" /tmp/copy-test.bin
sum_in=$(lab_run host2 'sha256sum /tmp/copy-test.bin' | cut -d' ' -f1)
lab_copy_out host2 /tmp/copy-test.bin "$LAB_RUN/copy-test.out"
[ "$sum_in" = "$(sha256sum <"$LAB_RUN/copy-test.bin" | cut -d' ' -f1)" ] || lab_fail "copy in: checksum differs"
cmp -s "$LAB_RUN/copy-test.bin" "$LAB_RUN/copy-test.out" || lab_fail "copy out: content differs"
rm -f "$LAB_RUN/copy-test.bin" "$LAB_RUN/copy-test.out"

lab_step "create PVH guest"
lab_create_guest host1 pvh smoke-pvh disk=16 net=1 ip=10.77.0.101/24
lab_figure pvh_create_s "$LAB_CREATE_SECONDS"

lab_step "create HVM guest"
lab_create_guest host1 hvm smoke-hvm disk=16
lab_figure hvm_create_s "$LAB_CREATE_SECONDS"

lab_step "PVH guest heartbeat"
lab_wait_console host1 smoke-pvh 'kemari-guest alive 1' 120
lab_figure pvh_alive_s "$LAB_WAIT_SECONDS"

lab_step "PVH guest has xen-blkfront and xen-netfront"
lab_wait_console host1 smoke-pvh 'kemari-guest modules: .*xen_blkfront.*xen_netfront' 10

lab_step "PVH guest disk writes"
lab_wait_console host1 smoke-pvh 'kemari-disk wrote 2' 60
lab_check_disk host1 smoke-pvh

lab_step "PVH guest TCP service answers host2"
out=
for _ in 1 2 3; do
  out=$(lab_run host2 'echo hello | nc -w 10 10.77.0.101 7000' 60) && break
  sleep 2
done
echo "$out"
case "$out" in *kemari-count*hello*) ;; *) lab_fail "unexpected answer from 10.77.0.101:7000: '$out'" ;; esac

lab_step "HVM guest heartbeat"
lab_wait_console host1 smoke-hvm 'kemari-guest alive 1' 240
lab_figure hvm_alive_s "$LAB_WAIT_SECONDS"
lab_wait_console host1 smoke-hvm 'kemari-guest modules: .*xen_blkfront.*xen_netfront' 10

lab_step "HVM guest disk writes"
lab_wait_console host1 smoke-hvm 'kemari-disk wrote 2' 60
lab_check_disk host1 smoke-hvm

lab_step "xl list shows both guests"
lab_run host1 'xl list'
lab_guest_live host1 smoke-pvh
lab_guest_live host1 smoke-hvm
