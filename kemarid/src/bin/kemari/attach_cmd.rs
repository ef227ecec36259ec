//! `kemari attach`: serve a disk to a guest with Kemari's userspace blkback (foreground).
//!
//! The guest is normally created paused with no disk in its xl config (`xl create -p`); this
//! command creates the device's xenstore nodes (`device/vbd/<devid>` in the guest,
//! `backend/kemari-vbd/<domid>/<devid>` in dom0), optionally unpauses the guest, and serves
//! the ring until the guest is gone or SIGINT/SIGTERM arrives. See docs/backends.md.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use hypervisor::Hypervisor;
use kemarid::debug;
use nix::sys::signal::{SigSet, Signal};
use xenbus_backend::{Vbd, VbdConfig, VbdStatus};

/// Arguments of `kemari attach`.
#[derive(Args, Debug)]
pub struct AttachArgs {
    /// Domain id or name (normally created paused, with no disk of its own at this vdev).
    pub domain: String,
    /// Raw disk image (or block device) to serve.
    #[arg(long)]
    pub disk: PathBuf,
    /// Virtual device name of the disk in the guest: xvda..xvdp.
    #[arg(long, default_value = "xvda")]
    pub vdev: String,
    /// Serve the disk read-only.
    #[arg(long)]
    pub readonly: bool,
    /// Unpause the guest once the device nodes exist.
    #[arg(long)]
    pub unpause: bool,
    /// Take over a device whose backend went away while the guest is connected (Kemari's
    /// `Attached` state: the ring is served from its current indexes, no handshake), instead of
    /// creating a new one.
    #[arg(long, conflicts_with = "unpause")]
    pub takeover: bool,
}

/// `xvdX` -> `virtual-device` (major 202, 16 minors per disk).
fn vdev_to_devid(vdev: &str) -> anyhow::Result<u32> {
    let letter = vdev
        .strip_prefix("xvd")
        .filter(|s| s.len() == 1)
        .and_then(|s| s.bytes().next())
        .filter(|b| (b'a'..=b'p').contains(b))
        .with_context(|| format!("--vdev {vdev:?}: expected xvda..xvdp"))?;
    Ok((202 << 8) | (u32::from(letter - b'a') << 4))
}

/// Blocks SIGINT/SIGTERM in this thread (inherited by threads spawned later) and returns a flag a
/// waiter thread sets when one arrives.
fn stop_on_signals() -> anyhow::Result<Arc<AtomicBool>> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block().context("blocking SIGTERM/SIGINT")?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = set.wait() {
                log::info!("{sig:?}: closing the device");
            }
            flag.store(true, Ordering::Relaxed);
        })
        .context("starting the signal thread")?;
    Ok(stop)
}

/// Runs `kemari attach`.
pub fn run(hv: &dyn Hypervisor, args: AttachArgs, json: bool) -> anyhow::Result<ExitCode> {
    let stop = stop_on_signals()?;
    let domid = debug::resolve_domain(hv, &args.domain)?;
    let devid = vdev_to_devid(&args.vdev)?;
    let config = VbdConfig {
        domid,
        devid,
        backend_domid: 0,
        image: args.disk.clone(),
        readonly: args.readonly,
        // on dom0's tmpfs: survives this process (a takeover after a crash reads it), not a reboot
        journal_dir: Some(PathBuf::from("/run/kemari")),
    };
    let xs = hv.open_xenstore().context("opening xenstore")?;
    let evtchn = hv.open_event_channels().context("opening event channels")?;
    let mut vbd = if args.takeover {
        Vbd::attach(hv, xs, evtchn, &config)
            .with_context(|| format!("taking over {} of domain {domid}", args.vdev))?
    } else {
        Vbd::create(hv, xs, evtchn, &config)
            .with_context(|| format!("creating {} for domain {domid}", args.vdev))?
    };
    let t0 = Instant::now();
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "kemari attach: domain {domid} {} ({}) served from {} at {}, state {}",
            args.vdev,
            devid,
            args.disk.display(),
            vbd.paths().backend,
            vbd.state()
        )?;
        out.flush()?;
    }
    if args.unpause {
        hv.unpause(domid)
            .with_context(|| format!("unpausing domain {domid}"))?;
    }
    let status = vbd.run(&stop).context("serving the disk")?;
    let s = vbd.stats().clone();
    let secs = t0.elapsed().as_secs_f64();
    if json {
        let v = serde_json::json!({
            "domid": domid,
            "devid": devid,
            "status": format!("{status:?}"),
            "seconds": secs,
            "requests": s.requests,
            "read_bytes": s.read_bytes,
            "write_bytes": s.write_bytes,
            "flushes": s.flushes,
            "discards": s.discards,
            "errors": s.errors,
            "notifies": s.notifies,
            "connects": s.connects,
            "persistent_maps": s.persistent_maps,
            "oneoff_maps": s.oneoff_maps,
        });
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, &v)?;
        writeln!(out)?;
    } else {
        println!(
            "kemari attach: domain {domid} {}: {status:?} after {secs:.1} s; {} requests, {} MiB read, {} MiB written, {} flushes, {} discards, {} errors, {} connects, {} pages mapped persistently, {} one-off mappings",
            args.vdev,
            s.requests,
            s.read_bytes >> 20,
            s.write_bytes >> 20,
            s.flushes,
            s.discards,
            s.errors,
            s.connects,
            s.persistent_maps,
            s.oneoff_maps
        );
    }
    Ok(match status {
        VbdStatus::Failed(_) => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vdev_names() {
        assert_eq!(vdev_to_devid("xvda").ok(), Some(51712));
        assert_eq!(vdev_to_devid("xvdb").ok(), Some(51728));
        assert_eq!(vdev_to_devid("xvdp").ok(), Some(51712 + 15 * 16));
        for bad in ["xvdq", "sda", "xvd", "xvdaa", ""] {
            assert!(vdev_to_devid(bad).is_err(), "{bad}");
        }
    }
}
