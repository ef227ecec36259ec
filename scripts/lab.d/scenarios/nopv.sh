# Scenario nopv: an HVM guest without PV interfaces (no Xen platform device, Linux with nopv;
# console on the emulated UART) under stock `xl save` / `xl restore`, the control experiment
# for Kemari's pause checkpoints of such a guest (docs/failover.md section 3).
#
# Two guests on host1, both with the memory writer: np-tty writes its console lines to the
# console tty (/dev/console = ttyS0, interrupt-driven), np-kmsg through the kernel log (the
# kernel's polled console driver, lab.con=kmsg). Each is saved and restored on host1. After
# each restore: do console lines continue, does the
# memory writer still dirty pages (log-dirty), where is the vCPU.
NP_MEM=${NP_MEM:-128}

np_alive_count() { # HOST NAME
  grep -c 'kemari-guest alive' "$(lab_guest_console_file "$1" "$2")" 2>/dev/null || echo 0
}

np_check() { # HOST NAME WHAT
  local h=$1 name=$2 what=$3 before after dirty
  before=$(np_alive_count "$h" "$name")
  lab_run "$h" "xl list -v $name 2>/dev/null | tail -1; kemari debug cpu-context $name 2>&1 | head -2" || true
  dirty=$(lab_run "$h" "kemari --json debug log-dirty $name --rounds 3 --interval-ms 1000" 120 |
    python3 -c 'import json, sys; print(sum(x["dirty_pages"] for x in json.load(sys.stdin)))' 2>/dev/null ||
    echo "?")
  sleep 8
  after=$(np_alive_count "$h" "$name")
  lab_run "$h" "xl list -v $name 2>/dev/null | tail -1; kemari debug cpu-context $name 2>&1 | head -2" || true
  lab_say "$name $what: console lines 'alive' $before -> $after in ~11 s; pages dirtied in 3 s: $dirty"
  lab_figure "${name}_${what}_alive_new" "$((after - before))"
  lab_figure "${name}_${what}_dirty_3s" "$dirty"
}

lab_step "boot 1 host"
lab_boot_hosts 1

for name in np-tty np-kmsg; do
  extra="lab.memwrite=256"
  [ "$name" = np-kmsg ] && extra="$extra lab.con=kmsg"
  lab_step "create $name (hvm-nopv) on host1"
  lab_create_guest host1 hvm-nopv "$name" "mem=$NP_MEM" "extra=$extra"
  lab_wait_console host1 "$name" 'kemari-guest alive 2' 240 || lab_fail "$name did not start"
  np_check host1 "$name" booted
done

for name in np-tty np-kmsg; do
  lab_step "$name: xl save, xl restore on host1"
  lab_run host1 "mkdir -p /var/lib/lab && rm -f /var/lib/lab/$name.sav && xl save $name /var/lib/lab/$name.sav && xl restore /var/lib/lab/$name.sav && rm -f /var/lib/lab/$name.sav" 400 ||
    lab_fail "xl save/restore of $name on host1"
  sleep 5
  np_check host1 "$name" restored_host1
done

lab_run host1 "dmesg | tail -5" || true
lab_say "host1 console tails:"
for name in np-tty np-kmsg; do tail -5 "$(lab_guest_console_file host1 "$name")" >&2 || true; done
