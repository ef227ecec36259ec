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
