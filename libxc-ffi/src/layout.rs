//! Compile-time size/offset checks of every Xen structure this crate hands to or reads from
//! the C libraries, with the values of the Xen 4.17 x86-64 ABI.  (bindgen's own layout tests
//! in `sys::types` check every field again under `cargo test`.)

use core::mem::{align_of, offset_of, size_of};

use crate::sys::types as t;

// xen_domctl_getdomaininfo = xc_domaininfo_t (domctl interface 0x15).
const _: () = assert!(size_of::<t::xc_domaininfo_t>() == 112);
const _: () = assert!(align_of::<t::xc_domaininfo_t>() == 8);
const _: () = assert!(offset_of!(t::xen_domctl_getdomaininfo, flags) == 4);
const _: () = assert!(offset_of!(t::xen_domctl_getdomaininfo, tot_pages) == 8);
const _: () = assert!(offset_of!(t::xen_domctl_getdomaininfo, max_pages) == 16);
const _: () = assert!(offset_of!(t::xen_domctl_getdomaininfo, shared_info_frame) == 48);
const _: () = assert!(offset_of!(t::xen_domctl_getdomaininfo, cpu_time) == 56);
const _: () = assert!(offset_of!(t::xen_domctl_getdomaininfo, nr_online_vcpus) == 64);
const _: () = assert!(offset_of!(t::xen_domctl_getdomaininfo, max_vcpu_id) == 68);
const _: () = assert!(offset_of!(t::xen_domctl_getdomaininfo, handle) == 76);
const _: () = assert!(offset_of!(t::xen_domctl_getdomaininfo, cpupool) == 92);
const _: () = assert!(offset_of!(t::xen_domctl_getdomaininfo, arch_config) == 104);

// xen_domctl_shadow_op_stats = xc_shadow_op_stats_t.
const _: () = assert!(size_of::<t::xc_shadow_op_stats_t>() == 8);
const _: () = assert!(offset_of!(t::xen_domctl_shadow_op_stats, dirty_count) == 4);

// struct xc_hypercall_buffer (what DECLARE_HYPERCALL_BUFFER declares).
const _: () = assert!(size_of::<t::xc_hypercall_buffer_t>() == 40);
const _: () = assert!(offset_of!(t::xc_hypercall_buffer, param_shadow) == 8);
const _: () = assert!(offset_of!(t::xc_hypercall_buffer, dir) == 16);
const _: () = assert!(offset_of!(t::xc_hypercall_buffer, ubuf) == 24);
const _: () = assert!(offset_of!(t::xc_hypercall_buffer, sz) == 32);

// HVM save records.
const _: () = assert!(size_of::<t::hvm_save_descriptor>() == 8);
const _: () = assert!(offset_of!(t::hvm_save_descriptor, instance) == 2);
const _: () = assert!(offset_of!(t::hvm_save_descriptor, length) == 4);
const _: () = assert!(size_of::<t::hvm_save_header>() == 24);
const _: () = assert!(size_of::<t::hvm_hw_cpu>() == 1032);
const _: () = assert!(offset_of!(t::hvm_hw_cpu, rax) == 512);
const _: () = assert!(offset_of!(t::hvm_hw_cpu, rip) == 640);
const _: () = assert!(offset_of!(t::hvm_hw_cpu, cr3) == 672);
const _: () = assert!(offset_of!(t::hvm_hw_cpu, tsc) == 1008);
const _: () = assert!(offset_of!(t::hvm_hw_cpu, flags) == 1024);

// vCPU context (xc_vcpu_getcontext).
const _: () = assert!(size_of::<t::vcpu_guest_context_x86_64_t>() == 5168);
const _: () = assert!(size_of::<t::vcpu_guest_context_any_t>() == 5168);

// evtchn_status = xc_evtchn_status_t.
const _: () = assert!(size_of::<t::xc_evtchn_status_t>() == 24);
const _: () = assert!(offset_of!(t::evtchn_status, port) == 4);
const _: () = assert!(offset_of!(t::evtchn_status, status) == 8);
const _: () = assert!(offset_of!(t::evtchn_status, vcpu) == 12);
const _: () = assert!(offset_of!(t::evtchn_status, u) == 16);

// xs_permissions.
const _: () = assert!(size_of::<t::xs_permissions>() == 8);

// xentoollog_logger: three function pointers.
const _: () = assert!(size_of::<t::xentoollog_logger>() == 24);

// Scalars.
const _: () = assert!(size_of::<t::xen_pfn_t>() == 8);
const _: () = assert!(size_of::<t::domid_t>() == 2);
const _: () = assert!(size_of::<t::evtchn_port_t>() == 4);
const _: () = assert!(size_of::<t::xs_transaction_t>() == 4);
