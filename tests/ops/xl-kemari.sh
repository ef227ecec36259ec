#!/usr/bin/env bash
# Tests of scripts/xl-kemari (the `xl kemari` wrapper) on the build machine: a fake "real xl" and
# a fake kemari in a temporary PATH record the argv, stdin and environment they get. Checks
# argument passthrough (global options, quoting, empty arguments, newlines, globs), exit
# statuses, the kemari subcommands and their errors. Runs the wrapper under every shell it
# may meet: /bin/sh (dash on Debian), bash, and busybox sh (the lab's dom0) when present.
set -uo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pass=0 fail=0

mkdir -p "$tmp/real" "$tmp/wrap" "$tmp/bin" "$tmp/empty"
# fake real xl: one line per argument between < >, then its stdin, exit $FAKE_XL_RC
cat >"$tmp/real/xl" <<'FAKE'
#!/bin/sh
echo "real-xl argc=$#"
for a in "$@"; do printf '<%s>\n' "$a"; done
[ -n "${FAKE_XL_STDIN:-}" ] && sed 's/^/stdin:/'
exit "${FAKE_XL_RC:-0}"
FAKE
cat >"$tmp/bin/kemari" <<'FAKE'
#!/bin/sh
echo "kemari argc=$# RUST_LOG=${RUST_LOG:-}"
for a in "$@"; do printf '<%s>\n' "$a"; done
exit "${FAKE_KEMARI_RC:-0}"
FAKE
cp "$here/scripts/xl-kemari" "$tmp/wrap/xl"
chmod 755 "$tmp/real/xl" "$tmp/bin/kemari" "$tmp/wrap/xl"

shells=(sh bash)
command -v busybox >/dev/null 2>&1 && shells+=("busybox sh")

# run SHELL ARGS...: runs the wrapper as xl with the wrapper first in PATH; sets out, rc
run() {
  local sh=$1
  shift
  # shellcheck disable=SC2086 # "busybox sh" is two words
  out=$(PATH="$tmp/wrap:$tmp/bin:$tmp/real:/usr/bin:/bin" $sh "$tmp/wrap/xl" "$@" 2>&1)
  rc=$?
}
check() { # NAME WANT_RC WANT_OUT
  if [ "$rc" = "$2" ] && [ "$out" = "$3" ]; then
    pass=$((pass + 1))
  else
    fail=$((fail + 1))
    printf 'FAIL [%s] %s: status %s (want %s), output:\n%s\n--- wanted:\n%s\n' "$sh" "$1" "$rc" "$2" "$out" "$3"
  fi
}
check_grep() { # NAME WANT_RC ERE
  if [ "$rc" = "$2" ] && printf '%s' "$out" | grep -qE "$3"; then
    pass=$((pass + 1))
  else
    fail=$((fail + 1))
    printf 'FAIL [%s] %s: status %s (want %s), output (want /%s/):\n%s\n' "$sh" "$1" "$rc" "$2" "$3" "$out"
  fi
}

nl='
'
for sh in "${shells[@]}"; do
  run "$sh" list
  check "xl list goes to the real xl" 0 "real-xl argc=1$nl<list>"
  run "$sh" -v list
  check "global option kept" 0 "real-xl argc=2$nl<-v>$nl<list>"
  run "$sh" -vvf -t list -l
  check "grouped global options kept" 0 "real-xl argc=4$nl<-vvf>$nl<-t>$nl<list>$nl<-l>"
  run "$sh" create 'a b' '' '*' '$HOME' "two${nl}lines" "it's" '"q"' '\n' -- -x
  check "quoting, empty, glob, newline" 0 "real-xl argc=11$nl<create>$nl<a b>$nl<>$nl<*>$nl<\$HOME>$nl<two${nl}lines>$nl<it's>$nl<\"q\">$nl<\\n>$nl<-->$nl<-x>"
  run "$sh" list kemari
  check "kemari as an argument, not the command" 0 "real-xl argc=2$nl<list>$nl<kemari>"
  run "$sh" kemari-x
  check "other command starting with kemari" 0 "real-xl argc=1$nl<kemari-x>"
  run "$sh" -z kemari status
  check "unknown global option: the real xl decides" 0 "real-xl argc=3$nl<-z>$nl<kemari>$nl<status>"
  run "$sh"
  check "no command: the real xl" 0 "real-xl argc=0"
  run "$sh" help
  check "xl help: the real xl" 0 "real-xl argc=1$nl<help>"
  for want in 0 1 3 42 255; do
    FAKE_XL_RC=$want run "$sh" destroy d1
    check "real xl exit status $want preserved" "$want" "real-xl argc=2$nl<destroy>$nl<d1>"
  done
  out=$(printf 'in1\nin2\n' | FAKE_XL_STDIN=1 PATH="$tmp/wrap:$tmp/bin:$tmp/real:/usr/bin:/bin" $sh "$tmp/wrap/xl" console d 2>&1)
  rc=$?
  check "stdin reaches the real xl" 0 "real-xl argc=2$nl<console>$nl<d>${nl}stdin:in1${nl}stdin:in2"

  run "$sh" kemari start 'dom 1' host2
  check "xl kemari start" 0 "kemari argc=3 RUST_LOG=$nl<start>$nl<dom 1>$nl<host2>"
  run "$sh" -v kemari status --json
  check "-v: RUST_LOG=info" 0 "kemari argc=2 RUST_LOG=info$nl<status>$nl<--json>"
  run "$sh" -v -v kemari events
  check "-v -v: RUST_LOG=debug" 0 "kemari argc=1 RUST_LOG=debug$nl<events>"
  out=$(RUST_LOG=warn PATH="$tmp/wrap:$tmp/bin:$tmp/real:/usr/bin:/bin" $sh "$tmp/wrap/xl" -vv kemari stop d 2>&1)
  rc=$?
  check "RUST_LOG set by the user wins" 0 "kemari argc=2 RUST_LOG=warn$nl<stop>$nl<d>"
  run "$sh" -f -- kemari checkpoint d ''
  check "-f and -- before kemari" 0 "kemari argc=3 RUST_LOG=$nl<checkpoint>$nl<d>$nl<>"
  run "$sh" kemari failover "a${nl}b" '*'
  check "quoting to kemari" 0 "kemari argc=3 RUST_LOG=$nl<failover>$nl<a${nl}b>$nl<*>"
  for pair in 0:0 1:1 2:2 3:1 101:1 130:130 141:141; do
    FAKE_KEMARI_RC=${pair%:*} run "$sh" kemari status d
    check "kemari status ${pair%:*} -> xl style ${pair#*:}" "${pair#*:}" "kemari argc=2 RUST_LOG=$nl<status>$nl<d>"
  done
  run "$sh" -N kemari stop d
  check "-N refused as xl refuses it" 1 "command does not implement -N (dryrun) option"
  run "$sh" kemari
  check_grep "xl kemari: usage, status 1" 1 '^Usage: xl \[-v\] kemari <subcommand>'
  run "$sh" help kemari
  check_grep "xl help kemari: usage, status 0" 0 '^Usage: xl \[-v\] kemari <subcommand>'
  run "$sh" kemari --help
  check_grep "xl kemari --help: usage, status 0" 0 ' start +Protect a domain'

  # the real xl found behind the wrapper in PATH, not the wrapper itself (no KEMARI_REAL_XL)
  mkdir -p "$tmp/copy"
  cp "$tmp/wrap/xl" "$tmp/copy/xl"
  out=$(PATH="$tmp/wrap:$tmp/copy:$tmp/real:/usr/bin:/bin" $sh "$tmp/wrap/xl" info 2>&1)
  rc=$?
  check "skips itself and copies of itself in PATH" 0 "real-xl argc=1$nl<info>"
  out=$(KEMARI_REAL_XL="$tmp/real/xl" PATH="$tmp/wrap:/usr/bin:/bin" $sh "$tmp/wrap/xl" info 2>&1)
  rc=$?
  check "KEMARI_REAL_XL" 0 "real-xl argc=1$nl<info>"
  out=$(PATH="$tmp/wrap:$tmp/empty:/usr/bin:/bin" $sh "$tmp/wrap/xl" info 2>&1)
  rc=$?
  if [ -e /usr/sbin/xl ] || ls /usr/lib/xen-*/bin/xl >/dev/null 2>&1; then
    pass=$((pass + 1)) # this machine has a real xl: the fallback finds it, not an error
  else
    check_grep "no real xl: error, status 127" 127 '^xl: the real xl was not found'
  fi
  mkdir -p "$tmp/lone/sbin"
  cp "$tmp/wrap/xl" "$tmp/lone/sbin/xl"
  out=$(KEMARI_REAL_XL="$tmp/real/xl" PATH="$tmp/lone/sbin:$tmp/empty:/usr/bin:/bin" $sh "$tmp/lone/sbin/xl" kemari status 2>&1)
  rc=$?
  check_grep "no kemari: error, status 127" 127 '^xl: kemari: the kemari command was not found'
  out=$(KEMARI_CLI="$tmp/bin/kemari" PATH="$tmp/wrap:$tmp/real:/usr/bin:/bin" $sh "$tmp/wrap/xl" kemari status 2>&1)
  rc=$?
  check "KEMARI_CLI" 0 "kemari argc=1 RUST_LOG=$nl<status>"
  # installed layout: PREFIX/sbin/xl finds PREFIX/bin/kemari without it in PATH
  mkdir -p "$tmp/prefix/sbin" "$tmp/prefix/bin"
  cp "$tmp/wrap/xl" "$tmp/prefix/sbin/xl"
  cp "$tmp/bin/kemari" "$tmp/prefix/bin/kemari"
  out=$(PATH="$tmp/prefix/sbin:$tmp/real:/usr/bin:/bin" $sh "$tmp/prefix/sbin/xl" kemari stop d 2>&1)
  rc=$?
  check "PREFIX/bin/kemari beside PREFIX/sbin/xl" 0 "kemari argc=2 RUST_LOG=$nl<stop>$nl<d>"
done

# the subcommands the wrapper's usage lists are kemari's: each answers --help (the real binary,
# built by cargo test before scripts/test runs this)
real_kemari=${CARGO_TARGET_DIR:-$here/target}/debug/kemari
if [ -x "$real_kemari" ]; then
  verbs=$(sh "$here/scripts/xl-kemari" help kemari | awk '/^ [a-z]+ +[A-Z]/ {print $1}')
  [ "$(echo "$verbs" | wc -w)" -ge 6 ] && pass=$((pass + 1)) || { fail=$((fail + 1)); echo "FAIL: usage lists too few subcommands: $verbs"; }
  for v in $verbs; do
    if "$real_kemari" "$v" --help >/dev/null 2>&1; then
      pass=$((pass + 1))
    else
      fail=$((fail + 1))
      echo "FAIL: xl kemari's usage lists '$v', which $real_kemari does not know"
    fi
  done
else
  echo "xl-kemari: $real_kemari not built: subcommand list not checked against kemari"
fi

echo "xl-kemari: $pass passed, $fail failed"
[ "$fail" = 0 ]
