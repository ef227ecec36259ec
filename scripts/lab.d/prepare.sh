# shellcheck shell=bash
# scripts/lab prepare: host packages, Debian .debs, unpacked tree, dom0 and guest images.
# Sourced by scripts/lab (after lib.sh). Everything lands in $LAB_CACHE (default <repo>/lab-cache).
#
# Cache layout:
#   $LAB_CACHE/debs/*.deb                 downloaded packages (kept across versions)
#   $LAB_CACHE/root-<debset>/             all debs unpacked (keyed on the exact .deb file names)
#   $LAB_CACHE/images-<key>/              xen.elf vmlinuz dom0.cpio guest.cpio KEY (key = debset + lab scripts)
#   $LAB_CACHE/current -> images-<key>    the last prepared (a run uses $LAB_IMAGES, set by prepare)

# Debian packages the lab needs (dom0 + guests). Library dependencies are added by closure below.
LAB_DEB_ROOTS=(xen-hypervisor-4.17-amd64 xen-utils-4.17 xen-utils-common xenstore-utils
  libxenmisc4.17 libxenhypfs1 qemu-system-xen qemu-system-data seabios ipxe-qemu
  busybox-static bash libc6 libgcc-s1)

# Kernel modules dom0 loads (dependencies are added and ordered with modprobe --show-depends).
LAB_DOM0_MODULES=(xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs xen-netback xen-blkback
  xen-pciback virtio_pci virtio_net 9p 9pnet_virtio bridge tun loop)
# Kernel modules guests load.
LAB_GUEST_MODULES=(xen-blkfront xen-netfront virtio_pci virtio_net virtio_blk
  xen-gntalloc xen-evtchn) # the last two: /dev/xen/gntalloc and evtchn for the hostile frontend

# Host tools `prepare` and `boot` need: command -> Debian package.
declare -A LAB_HOST_TOOLS=([qemu-system-x86_64]=qemu-system-x86 [busybox]=busybox-static
  [cpio]=cpio [depmod]=kmod [modprobe]=kmod [dpkg-deb]=dpkg [ss]=iproute2 [sha256sum]=coreutils
  [ldconfig]=libc-bin [zcat]=gzip [cargo]=cargo-from-rustup)

lab_need_root() { # run a command as root (sudo if we are not root)
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

lab_prepare_host_packages() {
  local missing=() t
  for t in "${!LAB_HOST_TOOLS[@]}"; do
    [ "$t" = cargo ] && continue
    command -v "$t" >/dev/null 2>&1 || missing+=("${LAB_HOST_TOOLS[$t]}")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    lab_say "installing host packages: ${missing[*]}"
    lab_need_root apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive lab_need_root apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # apt's lists must know the packages we download (fresh machines may have empty lists).
  if ! apt-cache show xen-hypervisor-4.17-amd64 >/dev/null 2>&1; then
    lab_say "apt lists do not know xen-hypervisor-4.17-amd64: running apt-get update"
    lab_need_root apt-get update -q >/dev/null
  fi
}

# Kernel package name, e.g. linux-image-6.1.0-56-amd64 (via the linux-image-amd64 metapackage).
lab_kernel_pkg() {
  apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-6\.1/ {print $2; exit}'
}

# Print "url filename" for every package in the closure (roots + their library dependencies).
lab_deb_list() {
  local kpkg
  kpkg=$(lab_kernel_pkg)
  [ -n "$kpkg" ] || lab_die "cannot resolve linux-image-amd64 to a 6.1 kernel package (apt lists?)"
  local closure
  closure=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
      --no-replaces --no-enhances "${LAB_DEB_ROOTS[@]}" 2>/dev/null |
    grep -v '^ ' | grep -v '^<' | sort -u |
    grep -E '^(lib|xen|qemu-system-(xen|data)$|seabios$|ipxe-qemu$|busybox-static$|bash$|zlib1g$)' |
    grep -vE '^lib(perl|python)')
  # shellcheck disable=SC2086
  apt-get download --print-uris $closure "$kpkg" 2>/dev/null | awk '{gsub("\047","",$1); print $1, $2}'
}

lab_prepare_debs() { # sets LAB_DEBSET (hash of exact file names)
  mkdir -p "$LAB_CACHE/debs"
  local list names=() missing=() f
  list=$(lab_deb_list)
  [ -n "$list" ] || lab_die "apt-get download --print-uris returned nothing"
  while read -r _ f; do
    names+=("$f")
    [ -s "$LAB_CACHE/debs/$f" ] || missing+=("$f")
  done <<<"$list"
  if [ "${#missing[@]}" -gt 0 ]; then
    lab_say "downloading ${#missing[@]} Debian packages into $LAB_CACHE/debs"
    local pkgs=()
    for f in "${missing[@]}"; do
      # file name is <name>_<version>_<arch>.deb with ':' encoded as %3a
      local n=${f%%_*} v=${f#*_}
      v=${v%_*}; v=${v//%3a/:}
      pkgs+=("$n=$v")
    done
    if ! (cd "$LAB_CACHE/debs" && apt-get download -q "${pkgs[@]}" >"$LAB_CACHE/download.log" 2>&1); then
      # stale apt lists name versions the mirror no longer has: refresh them and resolve again
      [ -z "${LAB_DEBS_RETRY:-}" ] || lab_die "apt-get download failed (see $LAB_CACHE/download.log)"
      lab_say "apt-get download failed; running apt-get update and trying once more"
      lab_need_root apt-get update -q >/dev/null || lab_die "apt-get update failed"
      LAB_DEBS_RETRY=1 lab_prepare_debs
      return
    fi
    for f in "${missing[@]}"; do
      [ -s "$LAB_CACHE/debs/$f" ] || lab_die "apt-get download did not produce $f"
    done
  fi
  printf '%s\n' "${names[@]}" | sort >"$LAB_CACHE/debs.list"
  LAB_DEBSET=$(sha256sum <"$LAB_CACHE/debs.list" | cut -c1-16)
}

lab_prepare_unpack() { # sets LAB_ROOT
  LAB_ROOT="$LAB_CACHE/root-$LAB_DEBSET"
  [ -e "$LAB_ROOT/.done" ] && return 0
  lab_say "unpacking $(wc -l <"$LAB_CACHE/debs.list") packages into $LAB_ROOT"
  rm -rf "$LAB_ROOT" "$LAB_ROOT.tmp"
  mkdir -p "$LAB_ROOT.tmp"
  local f
  while read -r f; do
    dpkg-deb -x "$LAB_CACHE/debs/$f" "$LAB_ROOT.tmp" || lab_die "dpkg-deb -x $f failed"
  done <"$LAB_CACHE/debs.list"
  # Debian's merged-/usr layout: the debs ship under /usr/lib and /lib both; make /lib* point to /usr.
  local kver
  kver=$(basename "$(ls -d "$LAB_ROOT.tmp"/lib/modules/6.1* "$LAB_ROOT.tmp"/usr/lib/modules/6.1* 2>/dev/null | head -1 || true)")
  [ -n "$kver" ] || lab_die "no kernel modules found in the unpacked linux-image package"
  local mroot="$LAB_ROOT.tmp"
  [ -d "$mroot/lib/modules/$kver" ] || mroot="$LAB_ROOT.tmp/usr"
  depmod -b "$mroot" "$kver" || lab_die "depmod failed"
  echo "$kver" >"$LAB_ROOT.tmp/.kver"
  echo "$mroot" | sed "s|^$LAB_ROOT.tmp||" >"$LAB_ROOT.tmp/.modroot"
  touch "$LAB_ROOT.tmp/.done"
  mv "$LAB_ROOT.tmp" "$LAB_ROOT"
  # older unpacked trees are of no further use
  local d
  for d in "$LAB_CACHE"/root-*; do
    [ "$d" = "$LAB_ROOT" ] || rm -rf "$d"
  done
}

# Hash of the lab files that go into the images.
lab_scripts_hash() {
  (cd "$LAB_DIR" && sha256sum prepare.sh dom0/* guest/* | sha256sum | cut -c1-16)
}

# ---- image building helpers (work on $STAGE, read from $LAB_ROOT) ----

# Library search path inside the unpacked tree.
lab_root_libpath() {
  echo "$LAB_ROOT/usr/lib/x86_64-linux-gnu:$LAB_ROOT/lib/x86_64-linux-gnu:$LAB_ROOT/usr/lib/xen-4.17/lib:$LAB_ROOT/usr/lib/x86_64-linux-gnu/pulseaudio"
}

# Resolve a path inside LAB_ROOT, following merged-/usr (lib -> usr/lib).
lab_root_file() {
  local p=$1
  if [ -e "$LAB_ROOT$p" ]; then echo "$LAB_ROOT$p"; return 0; fi
  if [ -e "$LAB_ROOT/usr$p" ]; then echo "$LAB_ROOT/usr$p"; return 0; fi
  return 1
}

# Copy a file from LAB_ROOT into STAGE at the same path (following symlinks, keeping the name).
lab_stage_copy() {
  local src=$1 dst=$2
  mkdir -p "$(dirname "$STAGE$dst")"
  cp -L "$src" "$STAGE$dst"
}

# Copy the shared libraries an ELF needs (resolved inside the unpacked tree with its own ld.so).
declare -A LAB_SEEN_LIBS
lab_stage_libs_of() {
  local elf=$1 ld line lib path
  ld=$(lab_root_file /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2) ||
    lab_die "no ld-linux-x86-64.so.2 in the unpacked libc6"
  while read -r line; do
    case "$line" in
      *"not found"*) lab_die "library missing for $elf: $line (add its package to LAB_DEB_ROOTS)" ;;
      *"=>"*) lib=${line%% =>*}; path=${line#*=> }; path=${path%% (*} ;;
      *) continue ;;
    esac
    [ -n "${LAB_SEEN_LIBS[$lib]:-}" ] && continue
    case "$path" in
      "$LAB_ROOT"/*) ;;
      *) lab_die "$elf needs $lib, found only on this machine ($path): add its package to the closure in prepare.sh" ;;
    esac
    LAB_SEEN_LIBS[$lib]=1
    lab_stage_copy "$path" "/usr/lib/x86_64-linux-gnu/$lib"
  done < <("$ld" --library-path "$(lab_root_libpath)" --list "$elf" 2>&1 || true)
}

# Stage an executable from the tree, plus its libraries.
lab_stage_bin() { # SRC_IN_ROOT DST_IN_STAGE
  local src
  src=$(lab_root_file "$1") || lab_die "not in the unpacked packages: $1"
  lab_stage_copy "$src" "$2"
  chmod 755 "$STAGE$2"
  if head -c4 "$src" | grep -q ELF; then lab_stage_libs_of "$src"; fi
}

# Copy kernel modules (with dependencies, in load order) and write $STAGE/etc/modules.order.
lab_stage_modules() { # MODULE...
  local kver modroot m line
  kver=$(cat "$LAB_ROOT/.kver")
  modroot="$LAB_ROOT$(cat "$LAB_ROOT/.modroot")"
  : >"$STAGE/etc/modules.order"
  declare -A seen=()
  for m in "$@"; do
    while read -r line; do
      case "$line" in
        insmod\ *)
          local ko=${line#insmod }
          ko=${ko%% *}
          local rel=${ko#"$modroot"}
          [ -n "${seen[$rel]:-}" ] && continue
          seen[$rel]=1
          mkdir -p "$(dirname "$STAGE$rel")"
          cp "$ko" "$STAGE$rel"
          echo "$rel" >>"$STAGE/etc/modules.order" ;;
        builtin\ *) ;;
        *) lab_die "modprobe --show-depends $m: unexpected '$line'" ;;
      esac
    done < <(modprobe -d "$modroot" -S "$kver" --show-depends "$m" 2>&1)
  done
}

lab_stage_busybox() {
  lab_stage_copy "$(lab_root_file /bin/busybox)" /bin/busybox
  chmod 755 "$STAGE/bin/busybox"
  local a
  for a in $("$STAGE/bin/busybox" --list); do
    case "$a" in busybox) continue ;; esac
    [ -e "$STAGE/bin/$a" ] || ln -s busybox "$STAGE/bin/$a"
  done
  mkdir -p "$STAGE/sbin" "$STAGE/usr/bin" "$STAGE/usr/sbin"
}

lab_cpio() { # DIR OUT
  (cd "$1" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) >"$2.tmp" &&
    mv "$2.tmp" "$2"
}

lab_build_dom0() { # OUT_CPIO
  STAGE="$1.d"
  rm -rf "$STAGE"
  mkdir -p "$STAGE"/{etc,proc,sys,dev,run,tmp,root,share,var/lib/xen,var/lib/xenstored,var/log/xen,usr/local/bin}
  ln -s ../run "$STAGE/var/run"
  LAB_SEEN_LIBS=()
  lab_stage_busybox
  lab_stage_bin /bin/bash /bin/bash
  # glibc's loader, under both names
  lab_stage_copy "$(lab_root_file /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2)" /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
  mkdir -p "$STAGE/lib64"
  ln -sf ../usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$STAGE/lib64/ld-linux-x86-64.so.2"
  ln -s usr/lib "$STAGE/lib"
  # Xen tools dom0 runs (libraries resolved with the tree's own loader)
  local f
  for f in xl xenstored xenconsoled xenconsole xen-init-dom0 libxl-save-helper lsevtchn xen-hvmctx \
      xenctx xen-diag readnotes; do
    lab_stage_bin "/usr/lib/xen-4.17/bin/$f" "/usr/lib/xen-4.17/bin/$f"
  done
  # firmware and data: hvmloader, /etc/xen (hotplug scripts, xl.conf), QEMU's ROMs, SeaBIOS, iPXE
  (cd "$LAB_ROOT" && find usr/lib/xen-4.17/boot usr/lib/xen-4.17/lib/python etc/xen usr/share/qemu \
      usr/share/seabios usr/lib/ipxe usr/lib/xen-common \( -type f -o -type l \) 2>/dev/null) |
    while read -r f; do
      [ -e "$STAGE/$f" ] && continue
      mkdir -p "$STAGE/$(dirname "$f")"
      cp -a "$LAB_ROOT/$f" "$STAGE/$f"
    done
  # xenstore utilities are links to one binary in /usr/bin
  for f in "$LAB_ROOT"/usr/bin/xenstore*; do
    [ -e "$f" ] || continue
    lab_stage_bin "/usr/bin/$(basename "$f")" "/usr/bin/$(basename "$f")"
  done
  # Device model for HVM guests
  lab_stage_bin /usr/libexec/xen-qemu-system-i386 /usr/libexec/xen-qemu-system-i386
  # the libraries the project's binaries dlopen (Xen's ABI) and glibc's dlopened libgcc_s
  for f in libxenctrl.so.4.17 libxenguest.so.4.17 libxenevtchn.so.1 libxengnttab.so.1 \
      libxenforeignmemory.so.1 libxenstore.so.4 libxentoollog.so.1 libxencall.so.1 \
      libxendevicemodel.so.1 libxentoolcore.so.1 libxenlight.so.4.17 libxlutil.so.4.17 \
      libxenhypfs.so.1 libgcc_s.so.1; do
    local p
    p=$(ls "$LAB_ROOT"/usr/lib/x86_64-linux-gnu/$f "$LAB_ROOT"/lib/x86_64-linux-gnu/$f \
      "$LAB_ROOT"/usr/lib/xen-4.17/lib/$f 2>/dev/null | head -1 || true)
    [ -n "$p" ] || lab_die "dom0 library $f not found in the unpacked packages"
    [ -e "$STAGE/usr/lib/x86_64-linux-gnu/$f" ] || lab_stage_copy "$p" "/usr/lib/x86_64-linux-gnu/$f"
    lab_stage_libs_of "$p"
  done
  lab_stage_modules "${LAB_DOM0_MODULES[@]}"
  # our init, agent and helpers
  cp "$LAB_DIR/dom0/init" "$STAGE/init"
  cp "$LAB_DIR/dom0/agent" "$STAGE/usr/local/bin/lab-agent"
  cp "$LAB_DIR/dom0/poweroff" "$STAGE/usr/local/bin/lab-poweroff"
  cp "$LAB_DIR/dom0/diskcheck" "$STAGE/usr/local/bin/lab-diskcheck"
  chmod 755 "$STAGE/init" "$STAGE/usr/local/bin/"lab-*
  printf '/usr/lib/x86_64-linux-gnu\n/usr/lib/xen-4.17/lib\n' >"$STAGE/etc/ld.so.conf"
  ldconfig -r "$STAGE" 2>/dev/null || true
  echo "root:x:0:0:root:/root:/bin/sh" >"$STAGE/etc/passwd"
  echo "root:x:0:" >"$STAGE/etc/group"
  lab_cpio "$STAGE" "$1"
}

lab_build_guest() { # OUT_CPIO
  STAGE="$1.d"
  rm -rf "$STAGE"
  mkdir -p "$STAGE"/{etc,proc,sys,dev,run,tmp,root}
  lab_stage_busybox
  lab_stage_modules "${LAB_GUEST_MODULES[@]}"
  cp "$LAB_DIR/guest/init" "$STAGE/init"
  chmod 755 "$STAGE/init"
  lab_cpio "$STAGE" "$1"
}

lab_prepare_images() { # sets LAB_IMAGES
  local key
  key="$LAB_DEBSET-$(lab_scripts_hash)"
  LAB_IMAGES="$LAB_CACHE/images-$key"
  if [ ! -e "$LAB_IMAGES/.done" ]; then
    lab_say "building dom0 and guest images ($LAB_IMAGES)"
    rm -rf "$LAB_IMAGES"
    mkdir -p "$LAB_IMAGES"
    local xgz kver
    xgz=$(ls "$LAB_ROOT"/boot/xen-4.17-amd64.gz 2>/dev/null | head -1 || true)
    [ -n "$xgz" ] || lab_die "no boot/xen-4.17-amd64.gz in the unpacked xen-hypervisor package"
    zcat "$xgz" >"$LAB_IMAGES/xen.elf"
    kver=$(cat "$LAB_ROOT/.kver")
    cp "$LAB_ROOT/boot/vmlinuz-$kver" "$LAB_IMAGES/vmlinuz"
    lab_build_dom0 "$LAB_IMAGES/dom0.cpio"
    lab_build_guest "$LAB_IMAGES/guest.cpio"
    rm -rf "$LAB_IMAGES/dom0.cpio.d" "$LAB_IMAGES/guest.cpio.d"
    echo "$key" >"$LAB_IMAGES/KEY"
    touch "$LAB_IMAGES/.done"
  fi
  touch "$LAB_IMAGES"
  ln -sfn "images-$key" "$LAB_CACHE/current"
  # keep the 3 most recently used image sets (checkouts sharing a cache may use different ones)
  local d
  for d in $(ls -dt "$LAB_CACHE"/images-* | tail -n +4); do
    [ "$d" = "$LAB_IMAGES" ] || rm -rf "$d"
  done
}

# Always (re)build: cargo is a no-op when nothing changed, and a lab that runs stale binaries lies.
# KEMARI_LAB_NO_BUILD=1 skips the build when the binaries exist.
lab_prepare_binaries() {
  if [ -z "${KEMARI_LAB_NO_BUILD:-}" ] || [ ! -x "$LAB_REPO/target/release/kemari" ] ||
    [ ! -x "$LAB_REPO/target/release/kemarid" ]; then
    command -v cargo >/dev/null 2>&1 || lab_die "cargo is not installed: cannot build target/release/kemari"
    # the lab is a test environment: its binaries carry the kill windows of scenario failpoints
    # (feature failpoints, KEMARI_DEBUG_FAILPOINT; off unless that variable is set)
    lab_say "building the project: cargo build --release -p kemarid --features failpoints"
    (cd "$LAB_REPO" && cargo build --release -p kemarid --features failpoints) ||
      lab_die "cargo build --release -p kemarid --features failpoints FAILED: the lab needs target/release/kemari and kemarid"
  fi
  [ -x "$LAB_REPO/target/release/kemari" ] && [ -x "$LAB_REPO/target/release/kemarid" ] ||
    lab_die "cargo build succeeded but target/release/kemari or kemarid is missing"
  # the hostile frontend (tests/hostile-frontend) runs in a guest, which has no libraries: a
  # static build, shipped as an initramfs appended to guest.cpio (lab_new_run, scenario hostile)
  if [ -z "${KEMARI_LAB_NO_BUILD:-}" ] || [ ! -x "$LAB_REPO/$LAB_HOSTILE_BIN" ]; then
    (cd "$LAB_REPO" && RUSTFLAGS="-C target-feature=+crt-static" \
      cargo build --release -p kemari-hostile --target x86_64-unknown-linux-gnu) ||
      lab_die "static build of kemari-hostile FAILED (needs glibc's static libc.a: libc6-dev)"
  fi
}
LAB_HOSTILE_BIN=target/x86_64-unknown-linux-gnu/release/kemari-hostile

lab_prepare() {
  local t0=$SECONDS
  lab_prepare_host_packages
  lab_prepare_debs
  lab_prepare_unpack
  lab_prepare_images
  lab_prepare_binaries
  lab_say "prepared in $((SECONDS - t0)) s: $LAB_IMAGES"
}
