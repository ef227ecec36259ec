//! This host's name, as the kernel knows it (`/proc/sys/kernel/hostname`).

/// The kernel's host name; `None` if it cannot be read or is empty.
pub fn kernel_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
}

/// This host's name for messages ("this host" when the kernel's cannot be read).
pub fn this_host() -> String {
    kernel_hostname().unwrap_or_else(|| "this host".into())
}
