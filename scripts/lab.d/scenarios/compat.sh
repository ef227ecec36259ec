# Scenario compat: interoperability of Kemari's stream codec with Xen 4.17's own tools.
#
# Part 1 (compat_decode_xl_save): our decoder reads real `xl save` images. A PVH and an HVM guest
# are saved with stock `xl save` in dom0; `kemari debug stream-info --json` must read each image
# completely and find the right guest type, a page count close to the guest's memory, an HVM
# context with a CPU record, and for HVM the QEMU device state (EMULATOR_CONTEXT). A truncated
# image must be refused with exit status 1 and a clear error.
#
# Part 2 (added separately): stock `xl restore` of an image written by our writer.

COMPAT_MEM=${COMPAT_MEM:-128}

compat_decode_xl_save() {
  local t name file json t0 secs
  lab_step "compat/decode: create PVH and HVM guests (${COMPAT_MEM} MiB)"
  for t in pvh hvm; do
    lab_create_guest host1 "$t" "compat-$t" "mem=$COMPAT_MEM"
  done

  lab_step "compat/decode: guests alive"
  lab_wait_console host1 compat-pvh 'kemari-guest alive 1' 120
  lab_wait_console host1 compat-hvm 'kemari-guest alive 1' 240

  for t in pvh hvm; do
    name=compat-$t
    file=/var/lib/lab/$name.xlsave
    lab_step "compat/decode: xl save $name"
    t0=$(lab_now)
    lab_run host1 "mkdir -p /var/lib/lab && rm -f $file && xl save $name $file" 300 ||
      lab_fail "xl save $name failed"
    secs=$(lab_since "$t0")
    lab_figure "${t}_xl_save_s" "$secs"

    lab_step "compat/decode: kemari debug stream-info --json on the $t image"
    t0=$(lab_now)
    json=$(lab_run host1 "kemari --json debug stream-info $file" 300) || {
      echo "$json" >&2
      lab_fail "kemari debug stream-info could not read the $t image written by xl save"
    }
    lab_figure "${t}_decode_s" "$(lab_since "$t0")"
    echo "$json" >"$LAB_RUN/compat-stream-info-$t.json"
    lab_run host1 "kemari debug stream-info $file" 300 >"$LAB_RUN/compat-stream-info-$t.txt" || true
    cat "$LAB_RUN/compat-stream-info-$t.txt" >&2

    # the first 64 KiB (headers, config, policies, first PAGE_DATA records) for the codec's
    # regression tests against real Xen bytes (stream/tests/data/)
    lab_run host1 "head -c 65536 $file >$file.head" 60 &&
      lab_copy_out host1 "$file.head" "$LAB_RUN/compat-xl-save-$t.head" ||
      lab_fail "cannot copy out the head of the $t image"

    lab_step "compat/decode: check what the $t image holds"
    python3 - "$LAB_RUN/compat-stream-info-$t.json" "$t" "$COMPAT_MEM" >>"$LAB_RUN/.figures" <<'PY' ||
import json, sys
r = json.load(open(sys.argv[1])); t = sys.argv[2]; mem_pages = int(sys.argv[3]) * 256
def need(cond, what):
    if not cond:
        print(f"{t}: {what}", file=sys.stderr)
        sys.exit(1)
need(r["guest_kind"] == t, f"guest kind {r['guest_kind']!r}, expected {t!r}")
need(r["config_guest_type"] == t, f"config type {r['config_guest_type']!r}")
need(r["domain"]["domain_type"] == "X86Hvm", f"libxc domain type {r['domain']['domain_type']}")
need(r["domain"]["page_shift"] == 12, "page shift")
need((r["domain"]["xen_major"], r["domain"]["xen_minor"]) == (4, 17), f"Xen {r['domain']['xen_major']}.{r['domain']['xen_minor']}")
need(r["libxc_version"] == 3, f"libxc stream v{r['libxc_version']}")
pages = r["pages"]["with_data"]
need(0.75 * mem_pages <= pages <= 1.15 * mem_pages + 2048,
     f"{pages} pages with data, guest has {mem_pages} pages of memory")
need(r["pages"]["max_per_record"] <= 1024, "more than 1024 pages in one PAGE_DATA")
recs = r["records"]
need(recs.get("libxc.STATIC_DATA_END", {}).get("count") == 1, "STATIC_DATA_END count")
need(recs.get("libxc.END", {}).get("count") == 1 and recs.get("libxl.END", {}).get("count") == 1, "END records")
ctx = r["hvm_contexts"]
need(len(ctx) == 1 and ctx[0]["parse_error"] is None, f"HVM context records: {ctx}")
need(ctx[0]["cpus"] >= 1, f"no CPU record in the HVM context: {ctx[0]['records']}")
need(len(r["hvm_params"]) > 0, "no HVM params")
emu = r["emulator_contexts"]
if t == "hvm":
    need(len(emu) == 1 and emu[0]["len"] > 0 and emu[0]["id"] == 2, f"emulator contexts {emu}")
else:
    need(emu == [], f"PVH image has emulator contexts {emu}")
print(f"{t}_pages={pages}")
print(f"{t}_page_records={r['pages']['records']}")
print(f"{t}_pfn_max={r['pages']['pfn_max']:#x}")
print(f"{t}_hvm_ctx_bytes={ctx[0]['len']}")
print(f"{t}_cpus={ctx[0]['cpus']}")
print(f"{t}_hvm_params={len(r['hvm_params'])}")
print(f"{t}_emulator_bytes={sum(e['len'] for e in emu)}")
print(f"{t}_image_bytes={r['total_bytes']}")
PY
      lab_fail "the $t image decoded, but not as expected (see the scenario log)"
  done

  lab_step "compat/decode: a truncated image is refused with a clear error"
  local err
  if err=$(lab_run host1 "head -c 1000000 /var/lib/lab/compat-hvm.xlsave >/var/lib/lab/compat-trunc.xlsave &&
      kemari debug stream-info /var/lib/lab/compat-trunc.xlsave" 120 2>&1); then
    lab_fail "stream-info accepted a truncated image"
  fi
  echo "$err" | grep -q 'not a valid xl save image: .*truncated' ||
    lab_fail "unclear error for a truncated image: $err"
  # the images take dom0 space (~140 MB each) that later steps need
  lab_run host1 "rm -f /var/lib/lab/compat-trunc.xlsave /var/lib/lab/compat-pvh.xlsave* /var/lib/lab/compat-hvm.xlsave*" 30 ||
    lab_fail "cannot remove the xl save images"
}

lab_step "boot hosts"
lab_boot_hosts "${LAB_NHOSTS:-2}"

compat_decode_xl_save

# Part 2 (compat_xl_restore_ours): stock `xl restore` of an image written by `kemari debug save`.
# A PVH and an HVM guest with a disk and a NIC run their workload; `kemari debug save --destroy`
# asks each to suspend, writes its image (our ImageWriter: memory, HVM context and params, QEMU's
# device state over QMP for HVM, the libxl config JSON) and destroys it; stock `xl restore`
# builds it again. Proof that the guest runs on from the saved memory and not from a fresh
# boot: its heartbeat counter continues past the last value before the save (and it never
# prints its boot line again), its TCP counter service (state in guest RAM) answers host2 with
# the next number, and its disk records stay intact and grow. Figures: image size, save time,
# restore time, time to the first heartbeat after the restore.
compat_xl_restore_ours() {
  local t name ip img clog json out t0 n_before last_alive count_before count_after lines_before
  local i=0
  for t in pvh hvm; do
    i=$((i + 1))
    name=compat-r-$t
    ip=$LAB_NET_PREFIX.$((120 + i))
    # on the 9p share (host disk): dom0's own filesystem is a RAM disk of ~500 MiB, already holding
    # part 1's xl save images and the guests' disks
    img=/share/compat-images/$name.kimg
    clog=$(lab_guest_console_file host1 "$name")

    lab_step "compat/restore: create $t guest $name (disk, NIC $ip)"
    lab_create_guest host1 "$t" "$name" "mem=$COMPAT_MEM" disk=16 net=1 "ip=$ip/24"
    lab_wait_console host1 "$name" 'kemari-guest alive 2' 300
    lab_wait_console host1 "$name" 'kemari-guest tcp service' 30
    lab_wait_console host1 "$name" 'kemari-disk wrote 2' 60

    lab_step "compat/restore: $name's TCP counter answers host2 before the save"
    count_before=$(compat_count "$ip") || lab_fail "$name: no answer from $ip:7000 before the save"
    echo "$name: counter before the save: $count_before" >&2

    lab_step "compat/restore: kemari debug save $name without --destroy: paused while saved, runs on"
    json=$(lab_run host1 "mkdir -p /share/compat-images && kemari --json debug save $name $img.paused" 600) || {
      echo "$json" >&2
      lab_fail "kemari debug save $name (pause mode) failed"
    }
    lab_figure "${t}_pause_mode_save_ms" "$(echo "$json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["total_ms"])')"
    lab_run host1 "kemari debug stream-info $img.paused >/dev/null && rm -f $img.paused" 300 ||
      lab_fail "stream-info cannot read the pause-mode image of $name"
    lab_guest_live host1 "$name" || lab_fail "$name is not running after a pause-mode save"
    last_alive=$({ grep -o 'kemari-guest alive [0-9]*' "$clog" || true; } | tail -1 | awk '{print $3}')
    lab_wait_console host1 "$name" "kemari-guest alive $((last_alive + 1))([^0-9]|\$)" 60 ||
      lab_fail "$name's heartbeat stopped after a pause-mode save"

    lab_step "compat/restore: kemari debug save $name --destroy"
    t0=$(lab_now)
    json=$(lab_run host1 "mkdir -p /share/compat-images && rm -f $img && kemari --json debug save $name $img --destroy" 600) || {
      echo "$json" >&2
      lab_fail "kemari debug save $name failed"
    }
    lab_figure "${t}_kemari_save_s" "$(lab_since "$t0")"
    echo "$json" >"$LAB_RUN/compat-save-$t.json"
    echo "$json" >&2
    if lab_run host1 "xl domid $name" 30 >/dev/null 2>&1; then
      lab_fail "$name still exists after kemari debug save --destroy"
    fi
    last_alive=$({ grep -o 'kemari-guest alive [0-9]*' "$clog" || true; } | tail -1 | awk '{print $3}')
    [ -n "$last_alive" ] || lab_fail "$name: no heartbeat on its console before the save"
    lines_before=$(wc -l <"$clog")
    python3 - "$LAB_RUN/compat-save-$t.json" "$t" >>"$LAB_RUN/.figures" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); t = sys.argv[2]
assert r["guest_type"] == t and r["mode"] == "Suspend", r
assert r["pages"] > 0 and (t == "pvh") == (r["device_state_bytes"] == 0), r
print(f"{t}_image_mib={r['image_bytes'] / 2**20:.1f}")
print(f"{t}_pages_saved={r['pages']}")
print(f"{t}_suspend_ms={r['quiesce_ms']}")
print(f"{t}_memory_copy_ms={r['memory_ms']}")
print(f"{t}_qemu_state_bytes={r['device_state_bytes']}")
PY
    # our image, read back by the codec's own reader (S's half checks xl's images the same way)
    lab_run host1 "kemari debug stream-info $img" 300 >"$LAB_RUN/compat-stream-info-ours-$t.txt" 2>&1 ||
      { cat "$LAB_RUN/compat-stream-info-ours-$t.txt" >&2; lab_fail "stream-info cannot read our own $t image"; }

    lab_step "compat/restore: stock xl restore of our $t image"
    t0=$(lab_now)
    out=$(lab_run host1 "xl restore $img" 600 2>&1) || {
      echo "$out" >&2
      lab_run host1 "tail -30 /var/log/xen/xl-$name.log /var/log/xen/qemu-dm-$name.log 2>/dev/null" 30 >&2 || true
      lab_fail "xl restore of the image kemari wrote for $name failed"
    }
    lab_figure "${t}_xl_restore_s" "$(lab_since "$t0")"
    echo "$out" >&2
    lab_run host1 "rm -f $img" 30 || true

    lab_step "compat/restore: $name runs on from the saved state"
    t0=$(lab_now)
    local deadline=$((SECONDS + 240)) next=""
    while [ $SECONDS -lt $deadline ]; do
      next=$(tail -n +"$((lines_before + 1))" "$clog" |
        awk 'f == "" && match($0, /kemari-guest alive [0-9]+/) { split(substr($0, RSTART, RLENGTH), w, " "); f = w[3] } END { print f }')
      [ -n "$next" ] && break
      sleep 1
    done
    [ -n "$next" ] || { tail -5 "$clog" >&2; lab_fail "$name: no heartbeat within 240 s of xl restore"; }
    lab_figure "${t}_first_heartbeat_s" "$(lab_since "$t0")"
    echo "$name: last heartbeat before the save $last_alive, first after the restore $next" >&2
    [ "$next" -gt "$last_alive" ] || lab_fail "$name restarted its heartbeat ($last_alive -> $next): not the saved memory"
    if tail -n +"$((lines_before + 1))" "$clog" | grep -q "kemari-guest $name up"; then
      lab_fail "$name booted again after xl restore"
    fi
    lab_guest_live host1 "$name" || lab_fail "$name is not running after xl restore"
    count_after=$(compat_count "$ip") || lab_fail "$name: no answer from $ip:7000 after the restore"
    echo "$name: counter after the restore: $count_after" >&2
    [ "$count_after" = $((count_before + 1)) ] ||
      lab_fail "$name's TCP counter went $count_before -> $count_after (expected $((count_before + 1)))"
    n_before=$({ grep -o 'kemari-disk wrote [0-9]*' "$clog" || true; } | tail -1 | awk '{print $3}')
    lab_wait_console host1 "$name" "kemari-disk wrote $((n_before + 2))" 120 ||
      lab_fail "$name's disk writer stopped after the restore"
    lab_check_disk host1 "$name"
    lab_figure "${t}_counter" "${count_before}to${count_after}"
    if [ "$t" = pvh ]; then
      compat_replica_on_host2 "$name" "$ip" "$count_after"
    else
      lab_run host1 "xl destroy $name" 60 || true
    fi
  done
}

# compat_replica_on_host2 NAME IP COUNT: the secondary's path. The running guest NAME (host1) is
# saved again by `kemari debug save --destroy`; the image and the guest's disk go to host2, where
# `kemari debug replica-restore` builds the replica NAME-replica the way the sync engine's
# receiver does (XlReplicaBuilder: `xl restore -p -e` of a copy renamed in its xl header); it
# must come up paused, and once unpaused run on from the saved memory: heartbeat continues, and
# host1 reaches its TCP counter (same address and MAC, now behind host2's bridge) with COUNT+1.
compat_replica_on_host2() {
  local name=$1 ip=$2 count=$3 replica=$1-replica img json last_alive clog2 st t0 next n
  img=/share/compat-images/$name.2.kimg
  clog2=$(lab_guest_console_file host2 "$replica")

  lab_step "compat/replica: save $name again on host1, move image and disk to host2"
  json=$(lab_run host1 "kemari --json debug save $name $img --destroy" 600) ||
    { echo "$json" >&2; lab_fail "second kemari debug save of $name failed"; }
  last_alive=$({ grep -o 'kemari-guest alive [0-9]*' "$(lab_guest_console_file host1 "$name")" || true; } | tail -1 | awk '{print $3}')
  mkdir -p "$(lab_host_dir host2)/share/compat-images"
  mv "$(lab_host_dir host1)$img" "$(lab_host_dir host2)$img"
  lab_copy_out host1 "/var/lib/lab/$name.img" "$LAB_RUN/$name.disk"
  lab_copy_in host2 "$LAB_RUN/$name.disk" "/var/lib/lab/$name.img"
  rm -f "$LAB_RUN/$name.disk"

  lab_step "compat/replica: kemari debug replica-restore on host2 builds $replica paused"
  json=$(lab_run host2 "kemari --json debug replica-restore $img $replica" 600) || {
    echo "$json" >&2
    lab_run host2 "tail -20 /var/log/xen/xl-$replica.log 2>/dev/null" 30 >&2 || true
    lab_fail "kemari debug replica-restore of $name on host2 failed"
  }
  echo "$json" >&2
  lab_figure replica_build_s "$(echo "$json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["build_ms"] / 1000)')"
  st=$(lab_guest_state host2 "$replica") || lab_fail "$replica does not exist on host2"
  case "$st" in *p*) ;; *) lab_fail "$replica on host2 is not paused after replica-restore ($st)" ;; esac
  lab_run host2 "rm -f $img" 30 || true

  lab_step "compat/replica: $replica runs on host2 from the saved memory"
  lab_run host2 "xl unpause $replica" 60
  t0=$(lab_now)
  next=""
  while [ -z "$next" ] && [ "$(lab_since "$t0" | cut -d. -f1)" -lt 240 ]; do
    next=$({ grep -o 'kemari-guest alive [0-9]*' "$clog2" 2>/dev/null || true; } | head -1 | awk '{print $3}')
    [ -n "$next" ] || sleep 1
  done
  [ -n "$next" ] || lab_fail "$replica: no heartbeat on host2 within 240 s"
  lab_figure replica_first_heartbeat_s "$(lab_since "$t0")"
  echo "$replica: last heartbeat on host1 $last_alive, first on host2 $next" >&2
  [ "$next" -gt "$last_alive" ] || lab_fail "$replica restarted its heartbeat ($last_alive -> $next)"
  if grep -q "kemari-guest $name up" "$clog2"; then lab_fail "$replica booted again on host2"; fi
  n=""
  for _ in 1 2 3 4 5; do
    n=$(lab_run host1 "echo hi | nc -w 10 $ip 7000" 60 2>/dev/null | sed -n 's/^kemari-count \([0-9]*\).*/\1/p') && [ -n "$n" ] && break
    sleep 3
  done
  echo "$replica: counter from host1 after the move: ${n:-none}" >&2
  [ "$n" = $((count + 1)) ] || lab_fail "$replica's TCP counter from host1: '${n:-none}', expected $((count + 1))"
  lab_figure replica_counter "${count}to$n"
  lab_guest_live host2 "$replica"
  lab_run host2 "xl destroy $replica" 60 || true
}

# compat_count IP: the number host2 gets from the guest's TCP counter service (3 tries).
compat_count() {
  local out n
  for _ in 1 2 3 4 5; do
    if out=$(lab_run host2 "echo hi | nc -w 10 $1 7000" 60 2>/dev/null); then
      n=$(echo "$out" | sed -n 's/^kemari-count \([0-9]*\).*/\1/p' | head -1)
      [ -n "$n" ] && { echo "$n"; return 0; }
    fi
    sleep 3
  done
  return 1
}

compat_xl_restore_ours
