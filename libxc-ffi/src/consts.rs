//! Xen constants callers pass to the safe API, re-exported from the generated bindings.

pub use crate::sys::types::{
    XENMAPSPACE_gmfn, XENMAPSPACE_gmfn_foreign, XENMAPSPACE_gmfn_range, XENMAPSPACE_grant_table,
    XENMAPSPACE_shared_info, XENMEM_resource_grant_table, XENMEM_resource_grant_table_id_shared,
    XENMEM_resource_grant_table_id_status, XENMEM_resource_ioreq_server, HVM_PARAM_ACPI_S_STATE,
    HVM_PARAM_CALLBACK_IRQ, HVM_PARAM_CONSOLE_EVTCHN, HVM_PARAM_CONSOLE_PFN, HVM_PARAM_IDENT_PT,
    HVM_PARAM_PAE_ENABLED, HVM_PARAM_STORE_EVTCHN, HVM_PARAM_STORE_PFN, HVM_PARAM_TIMER_MODE,
    HVM_PARAM_TRIPLE_FAULT_REASON, HVM_PARAM_VIRIDIAN, HVM_PARAM_VM86_TSS_SIZED,
    HVM_PARAM_VM_GENERATION_ID_ADDR, XEN_DOMCTL_INTERFACE_VERSION, XS_PERM_NONE, XS_PERM_READ,
    XS_PERM_WRITE,
};

use crate::sys::types::{__HVM_SAVE_TYPE_CPU, __HVM_SAVE_TYPE_END, __HVM_SAVE_TYPE_HEADER};

// xen/hvm/save.h encodes each record's typecode as the length of the `c` array in
// `struct __HVM_SAVE_TYPE_<name>` (HVM_SAVE_CODE); recover it from the generated layout.
macro_rules! hvm_save_code {
    ($ty:ty) => {
        (core::mem::offset_of!($ty, cpt) - core::mem::offset_of!($ty, c)) as u16
    };
}

/// HVM save record typecode of the end marker (`HVM_SAVE_CODE(END)`).
pub const HVM_SAVE_CODE_END: u16 = hvm_save_code!(__HVM_SAVE_TYPE_END);
/// HVM save record typecode of the header (`HVM_SAVE_CODE(HEADER)`).
pub const HVM_SAVE_CODE_HEADER: u16 = hvm_save_code!(__HVM_SAVE_TYPE_HEADER);
/// HVM save record typecode of a vCPU's `hvm_hw_cpu` (`HVM_SAVE_CODE(CPU)`).
pub const HVM_SAVE_CODE_CPU: u16 = hvm_save_code!(__HVM_SAVE_TYPE_CPU);

// The values written in xen/include/public/arch-x86/hvm/save.h (4.17).
const _: () = assert!(HVM_SAVE_CODE_END == 0);
const _: () = assert!(HVM_SAVE_CODE_HEADER == 1);
const _: () = assert!(HVM_SAVE_CODE_CPU == 2);
const _: () = assert!(XEN_DOMCTL_INTERFACE_VERSION == 0x15);
