//! libxc-ffi: the only place in the workspace that talks C to Xen's libraries.
pub mod sys;
