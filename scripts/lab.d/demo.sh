# shellcheck shell=bash
# scripts/lab demo: an honest tour of what the lab and the project can do today.
# Sourced by scripts/lab after prepare, with a run folder and cleanup trap in place.
if [ -t 1 ]; then b=$'\033[1m' f=$'\033[2m' n=$'\033[0m'; else b='' f='' n=''; fi
narrate() { printf '\n%s== %s%s\n' "$b" "$*" "$n"; }
show() { printf '%s%s$ %s%s\n' "$f" "$1" "$2" "$n"; lab_run "$1" "$2" || echo "[exit status $?]"; }

narrate "Booting two Xen 4.17 hosts, each a QEMU (TCG) running Xen + a Debian dom0, joined by a virtual network"
lab_boot_hosts 2 || lab_die "boot failed (logs in $LAB_RUN)"
echo "booted in $LAB_BOOT_SECONDS s; consoles in $LAB_RUN/host*/console.log"

narrate "Each dom0 runs Xen's toolstack"
show host1 'xl info | grep -E "^(host|release|xen_version|total_memory|free_memory)"'

narrate "The dom0s reach each other over bridge xenbr0 (host1 10.77.0.1, host2 10.77.0.2)"
show host1 'ping -c 3 10.77.0.2'

narrate "Creating a PVH guest on host1 (Debian kernel, busybox init: heartbeat, disk writer, TCP service)"
lab_create_guest host1 pvh demo-pvh disk=16 net=1 ip=10.77.0.101/24 || lab_die "guest creation failed"
lab_wait_console host1 demo-pvh 'kemari-guest alive 2' 180 || lab_die "guest did not come up"
show host1 'xl list'
echo "guest console (last lines):"
tail -4 "$(lab_guest_console_file host1 demo-pvh)"

narrate "host2's dom0 talks to the guest on host1 over the virtual network"
show host2 'echo hello | nc -w 10 10.77.0.101 7000'

narrate "The project's binaries, built from this checkout, run in dom0"
show host1 'kemari --help'
show host1 'kemari debug domains'

narrate "Not shown yet: protection and failover (kemarid is still being written)"
echo "Logs of this demo: $LAB_RUN"
