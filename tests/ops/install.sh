#!/usr/bin/env bash
# Tests of scripts/install and scripts/kemarid.service on the build machine: installs into a
# temporary DESTDIR (kemari/kemarid taken from a --bin-dir of stand-ins: the tree is what is
# checked) and checks the tree, the modes, the unit's ExecStart, that the configuration is
# installed only when absent, that an existing real xl is never overwritten (and nothing is
# half-installed then), --prefix, --uninstall and --purge; and `systemd-analyze verify` of the
# installed unit, with MANPATH on the installed manual pages (verify looks up Documentation=).
set -uo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pass=0 fail=0
ok() { pass=$((pass + 1)); }
bad() { fail=$((fail + 1)); echo "FAIL: $*"; }
expect() { # DESCRIPTION COMMAND...
  local what=$1
  shift
  if "$@"; then ok; else bad "$what"; fi
}

mkdir -p "$tmp/bin"
for b in kemari kemarid; do printf '#!/bin/sh\necho %s stand-in\n' "$b" >"$tmp/bin/$b"; chmod 755 "$tmp/bin/$b"; done
inst() { "$repo/scripts/install" --no-build --bin-dir "$tmp/bin" "$@" >"$tmp/out" 2>&1; }
mode() { stat -c %a "$1"; }

d=$tmp/d1
expect "install into a DESTDIR" inst --destdir "$d"
cat "$tmp/out"
expect "kemari in PREFIX/bin, 755" test "$(mode "$d/usr/local/bin/kemari")" = 755
expect "kemarid in PREFIX/sbin, 755" test "$(mode "$d/usr/local/bin/kemarid")" = 755
expect "the wrapper is PREFIX/sbin/xl" cmp -s "$repo/scripts/xl-kemari" "$d/usr/local/sbin/xl"
expect "wrapper 755" test "$(mode "$d/usr/local/sbin/xl")" = 755
expect "kemari.1 installed" test -f "$d/usr/local/share/man/man1/kemari.1"
expect "kemarid.8 installed" test -f "$d/usr/local/share/man/man8/kemarid.8"
expect "every page of man/ installed" test "$(ls "$d"/usr/local/share/man/man*/ | grep -c '\.[18]$')" = "$(ls "$repo"/man | grep -c '\.[18]$')"
expect "configuration installed" cmp -s "$repo/scripts/kemarid.conf" "$d/etc/kemari/kemarid.conf"
expect "unit installed" test -f "$d/etc/systemd/system/kemarid.service"
expect "unit's ExecStart is PREFIX/bin/kemarid" grep -qx 'ExecStart=/usr/local/bin/kemarid' "$d/etc/systemd/system/kemarid.service"
expect "manifest lists what was installed" test "$(wc -l <"$d/usr/local/share/kemari/install-manifest")" = "$(($(ls "$repo"/man | grep -c '\.[18]$') + 4))"
expect "nothing outside the expected folders" test -z "$(cd "$d" && find . -type f | grep -vE '^\./(usr/local/(bin|sbin|share/man/man[18]|share/kemari)|etc/kemari|etc/systemd/system)/')"

# the unit passes systemd-analyze verify (ExecStart pointed into the DESTDIR: verify checks
# that it is executable; Documentation= man pages looked up in the installed tree)
if command -v systemd-analyze >/dev/null 2>&1; then
  mkdir -p "$tmp/unit"
  sed "s|^ExecStart=/usr/local/bin/kemarid|ExecStart=$d/usr/local/bin/kemarid|" "$d/etc/systemd/system/kemarid.service" >"$tmp/unit/kemarid.service"
  v=$(MANPATH="$d/usr/local/share/man" systemd-analyze verify "$tmp/unit/kemarid.service" 2>&1)
  expect "systemd-analyze verify: status 0" test $? = 0
  expect "systemd-analyze verify: no diagnostics ($v)" test -z "$v"
  # and it would catch a broken unit
  sed 's/^Type=notify/Type=notifyy/' "$tmp/unit/kemarid.service" >"$tmp/unit/broken.service"
  v=$(MANPATH="$d/usr/local/share/man" systemd-analyze verify "$tmp/unit/broken.service" 2>&1)
  expect "verify reports a bad Type= ($v)" grep -qi "service type" <<<"$v"
else
  bad "systemd-analyze not installed (apt-get install systemd; .ci/run does)"
fi
u=$repo/scripts/kemarid.service
expect "Type=notify" grep -qx 'Type=notify' "$u"
expect "Restart=on-failure" grep -qx 'Restart=on-failure' "$u"
expect "KillMode=process" grep -qx 'KillMode=process' "$u"
expect "After= xenstored and xen-init-dom0" grep -qE '^After=.*xenstored\.service.*xen-init-dom0\.service' "$u"
expect "Wants= xenstored and xen-init-dom0" grep -qE '^Wants=.*xenstored\.service.*xen-init-dom0\.service' "$u"

# an existing configuration is kept
echo "# edited by the admin" >>"$d/etc/kemari/kemarid.conf"
cp "$d/etc/kemari/kemarid.conf" "$tmp/conf.edited"
expect "reinstall" inst --destdir "$d"
expect "reinstall keeps the edited configuration" cmp -s "$tmp/conf.edited" "$d/etc/kemari/kemarid.conf"
expect "reinstall says so" grep -q 'kept the existing' "$tmp/out"

# a real xl at PREFIX/sbin/xl is never overwritten, and nothing else is installed then
d2=$tmp/d2
mkdir -p "$d2/usr/sbin"
printf '\177ELF real xl\n' >"$d2/usr/sbin/xl"
inst --destdir "$d2" --prefix /usr
expect "refuses to overwrite a real xl (status)" test $? != 0
expect "refuses to overwrite a real xl (message)" grep -q 'refusing to overwrite .*/usr/sbin/xl' "$tmp/out"
expect "the real xl is untouched" grep -q 'real xl' "$d2/usr/sbin/xl"
expect "nothing half-installed" test "$(cd "$d2" && find . -type f | wc -l)" = 1

# --prefix
d3=$tmp/d3
expect "install --prefix /opt/kemari" inst --destdir "$d3" --prefix /opt/kemari
expect "kemari under the prefix" test -x "$d3/opt/kemari/bin/kemari"
expect "unit follows the prefix" grep -qx 'ExecStart=/opt/kemari/bin/kemarid' "$d3/etc/systemd/system/kemarid.service"
expect "configuration stays in /etc" test -f "$d3/etc/kemari/kemarid.conf"
expect "relative prefix refused" bash -c "! '$repo/scripts/install' --no-build --bin-dir '$tmp/bin' --destdir '$d3' --prefix opt >/dev/null 2>&1"
expect "unknown argument refused" bash -c "! '$repo/scripts/install' --frobnicate >/dev/null 2>&1"
expect "missing binaries refused" bash -c "! '$repo/scripts/install' --no-build --bin-dir '$tmp/none' --destdir '$tmp/d5' >/dev/null 2>&1"

# uninstall: everything but the configuration, then --purge
expect "uninstall" inst --destdir "$d" --uninstall
expect "after uninstall only the configuration is left" test "$(cd "$d" && find . -type f)" = "./etc/kemari/kemarid.conf"
expect "uninstall again: no manifest, refused" bash -c "! '$repo/scripts/install' --destdir '$d' --uninstall >/dev/null 2>&1"
# the wrapper replaced by something else since: kept
expect "install --prefix /opt/kemari again" inst --destdir "$d3" --prefix /opt/kemari
printf 'not ours\n' >"$d3/opt/kemari/sbin/xl"
expect "uninstall --purge" inst --destdir "$d3" --prefix /opt/kemari --uninstall --purge
expect "a foreign file at the wrapper's path is kept" grep -q 'not ours' "$d3/opt/kemari/sbin/xl"
expect "after --purge nothing else is left" test "$(cd "$d3" && find . -type f)" = "./opt/kemari/sbin/xl"

echo "install: $pass passed, $fail failed"
[ "$fail" = 0 ]
