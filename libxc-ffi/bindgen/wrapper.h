/*
 * Input for scripts/bindgen.sh: every Xen 4.17 header whose declarations libxc-ffi uses.
 * Generated output lives in libxc-ffi/src/sys/; do not edit it by hand.
 */
#include <xenctrl.h>
#include <xenguest.h>
#include <xenevtchn.h>
#include <xengnttab.h>
#include <xenforeignmemory.h>
#include <xenstore.h>
#include <xentoollog.h>
#include <xen/version.h>
#include <xen/memory.h>
#include <xen/event_channel.h>
#include <xen/hvm/params.h>
#include <xen/hvm/save.h>
