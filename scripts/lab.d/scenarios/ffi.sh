# Scenario ffi: the proof that libxc-ffi and the hypervisor traits work on real Xen 4.17.
# In dom0, against a running PVH and a running HVM guest, `kemari debug selftest` lists domains,
# pauses and unpauses the guest (seen through domain info), reads and parses its HVM context,
# enables log-dirty and harvests pages the guest writes, copies out a page it wrote (stable while
# paused), and reads a xenstore key and sees its own write through a watch. Also checks that
# kemarid accepts the host and that the CLI's error for an unknown domain is clear.

lab_step "boot hosts"
lab_boot_hosts "${LAB_NHOSTS:-2}"

lab_step "kemarid --check accepts the host"
lab_run host1 'kemarid --check'

lab_step "create PVH and HVM guests"
lab_create_guest host1 pvh ffi-pvh
lab_create_guest host1 hvm ffi-hvm

lab_step "guests alive"
lab_wait_console host1 ffi-pvh 'kemari-guest alive 1' 120
lab_wait_console host1 ffi-hvm 'kemari-guest alive 1' 480

lab_step "kemari debug domains lists both guests"
out=$(lab_run host1 'kemari debug domains')
echo "$out" >&2
for t in pvh hvm; do
  id=$(lab_run host1 "xl domid ffi-$t")
  echo "$out" | awk -v id="$id" -v t="$t" '$1 == id && $2 == t {f=1} END {exit !f}' ||
    lab_fail "kemari debug domains does not list domain $id as $t"
done

lab_step "unknown domain gives a clear error"
if err=$(lab_run host1 'kemari debug pause no-such-guest' 2>&1); then
  lab_fail "pausing an unknown domain succeeded"
fi
echo "$err" | grep -q 'no domain named "no-such-guest"' || lab_fail "unclear error for an unknown domain: $err"

for t in pvh hvm; do
  lab_step "selftest on the $t guest"
  json=$(lab_run host1 "kemari --json debug selftest ffi-$t --rounds 3 --interval-ms 1000" 180) || {
    echo "$json" >&2
    lab_fail "kemari debug selftest ffi-$t failed"
  }
  echo "$json" >"$LAB_RUN/selftest-$t.json"
  echo "$json" >&2
  python3 - "$LAB_RUN/selftest-$t.json" "$t" >>"$LAB_RUN/.figures" <<'PY'
import json, re, sys
r = json.load(open(sys.argv[1])); t = sys.argv[2]
assert r["ok"], r
steps = {s["step"]: s for s in r["steps"]}
assert set(steps) == {"list-domains", "pause-unpause", "hvm-context", "log-dirty", "map-page", "xenstore-watch"}, steps
dirty = re.search(r"dirty per round \[([0-9, ]*)\]", steps["log-dirty"]["detail"]).group(1)
print(f"{t}_dirty_per_round={dirty.replace(' ', '')}")
m = re.search(r"pause (\d+) us, unpause (\d+) us", steps["pause-unpause"]["detail"])
print(f"{t}_pause_us={m.group(1)}")
PY
done

lab_step "guests still running after the selftests"
for t in pvh hvm; do
  st=$(lab_guest_state host1 "ffi-$t")
  case "$st" in *p*) lab_fail "ffi-$t left paused ($st)" ;; *r*|*b*) ;; *) lab_fail "ffi-$t in state '$st'" ;; esac
done
n=$(grep -c 'kemari-guest alive' "$(lab_guest_console_file host1 ffi-pvh)")
sleep 5
n2=$(grep -c 'kemari-guest alive' "$(lab_guest_console_file host1 ffi-pvh)")
[ "$n2" -gt "$n" ] || lab_fail "ffi-pvh heartbeat stopped after the selftest ($n -> $n2)"
