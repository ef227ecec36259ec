//! `kemari attach`: serve a disk (userspace blkback) and/or a NIC (userspace netback) to a guest
//! (foreground).
//!
//! The guest is normally created paused with no disk/vif in its xl config (`xl create -p`); this
//! command creates the devices' xenstore nodes (`device/vbd/<devid>` in the guest,
//! `backend/kemari-vbd/<domid>/<devid>` in dom0; `device/vif/<devid>` and
//! `backend/kemari-vif/<domid>/<devid>` plus a tap device for a NIC), optionally unpauses the
//! guest, and serves the rings until the guest is gone or SIGINT/SIGTERM arrives (the disk in
//! this thread, the NIC in a second one). See docs/backends.md.

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
use kemarid::session::outputs::{create_vif, describe_vif, vdev_to_devid, VifSpec};
use nix::sys::signal::{SigSet, Signal};
use xenbus_backend::netback::parse_mac;
use xenbus_backend::{Vbd, VbdConfig, VbdStatus, VifStatus};

/// Arguments of `kemari attach`.
#[derive(Args, Debug)]
pub struct AttachArgs {
    /// Domain id or name (normally created paused, with no disk of its own at this vdev).
    pub domain: String,
    /// Raw disk image (or block device) to serve.
    #[arg(long, required_unless_present = "vif")]
    pub disk: Option<PathBuf>,
    /// Serve a NIC with Kemari's netback, its frames through a tap device in dom0. Optional
    /// comma-separated settings: mac=00:16:3e:xx:xx:xx, bridge=BRIDGE (add the tap to it),
    /// devid=N (the vif's handle, default 0), ifname=NAME (tap name, default kvif<domid>.<devid>),
    /// gso=0 (no scatter-gather/TCPv4 segmentation offload: the guest sends MTU-sized frames).
    #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "SETTINGS")]
    pub vif: Option<String>,
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
    #[arg(long, conflicts_with_all = ["unpause", "vif"], requires = "disk")]
    pub takeover: bool,
}

/// `--vif` settings.
pub(crate) fn parse_vif_spec(spec: &str) -> anyhow::Result<VifSpec> {
    let mut v = VifSpec::default();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, val) = item
            .split_once('=')
            .with_context(|| format!("--vif {item:?}: expected key=value"))?;
        match k.trim() {
            "mac" => {
                v.mac = Some(parse_mac(val.trim()).with_context(|| {
                    format!("--vif mac={val:?}: expected a unicast aa:bb:cc:dd:ee:ff")
                })?)
            }
            "bridge" => v.bridge = Some(val.trim().to_owned()),
            "devid" => {
                v.devid = val
                    .trim()
                    .parse()
                    .with_context(|| format!("--vif devid={val:?}: expected a number"))?
            }
            "ifname" => v.ifname = Some(val.trim().to_owned()),
            "gso" => {
                v.gso = match val.trim() {
                    "1" | "on" => true,
                    "0" | "off" => false,
                    other => anyhow::bail!("--vif gso={other:?}: expected 0/1/on/off"),
                }
            }
            other => {
                anyhow::bail!("--vif: unknown setting {other:?} (mac, bridge, devid, ifname, gso)")
            }
        }
    }
    Ok(v)
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
    let vif_spec = args.vif.as_deref().map(parse_vif_spec).transpose()?;
    let stop = stop_on_signals()?;
    let domid = debug::resolve_domain(hv, &args.domain)?;
    let devid = vdev_to_devid(&args.vdev)?;
    let mut vbd = match &args.disk {
        None => None,
        Some(disk) => {
            let config = VbdConfig {
                domid,
                devid,
                backend_domid: 0,
                image: disk.clone(),
                readonly: args.readonly,
                // on dom0's tmpfs: survives this process (a takeover after a crash reads it), not a reboot
                journal_dir: Some(PathBuf::from("/run/kemari")),
            };
            let xs = hv.open_xenstore().context("opening xenstore")?;
            let evtchn = hv.open_event_channels().context("opening event channels")?;
            let vbd = if args.takeover {
                Vbd::attach(hv, xs, evtchn, &config)
                    .with_context(|| format!("taking over {} of domain {domid}", args.vdev))?
            } else {
                Vbd::create(hv, xs, evtchn, &config)
                    .with_context(|| format!("creating {} for domain {domid}", args.vdev))?
            };
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "kemari attach: domain {domid} {} ({}) served from {} at {}, state {}",
                args.vdev,
                devid,
                disk.display(),
                vbd.paths().backend,
                vbd.state()
            )?;
            out.flush()?;
            Some(vbd)
        }
    };
    let vif = match &vif_spec {
        None => None,
        Some(spec) => {
            let vif = create_vif(hv, domid, spec)?;
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "kemari attach: domain {domid} {}, state {}",
                describe_vif(&vif, spec, true),
                vif.state()
            )?;
            out.flush()?;
            Some(vif)
        }
    };
    let t0 = Instant::now();
    if args.unpause {
        hv.unpause(domid)
            .with_context(|| format!("unpausing domain {domid}"))?;
    }
    let (disk_status, vif_done) = std::thread::scope(|scope| {
        let vif_thread = vif.map(|mut vif| {
            let stop = &stop;
            std::thread::Builder::new()
                .name("vif".into())
                .spawn_scoped(scope, move || {
                    let status = vif.run(stop);
                    if status.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    (status, vif.stats().clone(), vif.config().devid)
                })
        });
        let disk_status = vbd.as_mut().map(|vbd| {
            let r = vbd.run(&stop);
            if r.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            r
        });
        let vif_done = match vif_thread {
            None => None,
            Some(Err(e)) => Some(Err(anyhow::anyhow!("starting the vif thread: {e}"))),
            Some(Ok(h)) => Some(
                h.join()
                    .map_err(|_| anyhow::anyhow!("the vif thread panicked")),
            ),
        };
        (disk_status, vif_done)
    });
    let secs = t0.elapsed().as_secs_f64();
    let mut failed = false;
    if let Some(vbd) = &vbd {
        let status = disk_status
            .context("no disk status")?
            .context("serving the disk")?;
        failed |= matches!(status, VbdStatus::Failed(_));
        report_disk(vbd, &args.vdev, devid, domid, &status, secs, json)?;
    }
    if let Some(done) = vif_done {
        let (status, s, vif_devid) = done?;
        let status = status.context("serving the vif")?;
        failed |= matches!(status, VifStatus::Failed(_));
        if json {
            let v = serde_json::json!({
                "domid": domid,
                "device": "vif",
                "devid": vif_devid,
                "status": format!("{status:?}"),
                "seconds": secs,
                "tx_packets": s.tx_packets,
                "tx_bytes": s.tx_bytes,
                "tx_errors": s.tx_errors,
                "tx_dropped": s.tx_dropped,
                "rx_packets": s.rx_packets,
                "rx_bytes": s.rx_bytes,
                "rx_errors": s.rx_errors,
                "rx_dropped": s.rx_dropped,
                "notifies": s.notifies,
                "connects": s.connects,
            });
            let mut out = std::io::stdout().lock();
            serde_json::to_writer(&mut out, &v)?;
            writeln!(out)?;
        } else {
            println!(
                "kemari attach: domain {domid} vif {vif_devid}: {status:?} after {secs:.1} s; tx {} packets ({} bytes), rx {} packets ({} bytes), {} tx errors, {} tx dropped, {} rx errors, {} rx dropped, {} connects",
                s.tx_packets,
                s.tx_bytes,
                s.rx_packets,
                s.rx_bytes,
                s.tx_errors,
                s.tx_dropped,
                s.rx_errors,
                s.rx_dropped,
                s.connects
            );
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Prints the disk's counters.
fn report_disk(
    vbd: &Vbd<'_>,
    vdev: &str,
    devid: u32,
    domid: hypervisor::DomId,
    status: &VbdStatus,
    secs: f64,
    json: bool,
) -> anyhow::Result<()> {
    let s = vbd.stats().clone();
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
            "kemari attach: domain {domid} {vdev}: {status:?} after {secs:.1} s; {} requests, {} MiB read, {} MiB written, {} flushes, {} discards, {} errors, {} connects, {} pages mapped persistently, {} one-off mappings",
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vif_settings() {
        assert_eq!(parse_vif_spec("").unwrap(), VifSpec::default());
        let v = parse_vif_spec("mac=00:16:3e:01:02:03, bridge=xenbr0,devid=2,ifname=t0").unwrap();
        assert_eq!(v.mac, Some([0, 0x16, 0x3e, 1, 2, 3]));
        assert_eq!(v.bridge.as_deref(), Some("xenbr0"));
        assert_eq!((v.devid, v.ifname.as_deref()), (2, Some("t0")));
        assert!(v.gso);
        assert!(!parse_vif_spec("gso=off").unwrap().gso);
        for bad in [
            "mac=01:00:5e:00:00:01",
            "devid=x",
            "color=red",
            "bridge",
            "gso=2",
        ] {
            assert!(parse_vif_spec(bad).is_err(), "{bad}");
        }
    }
}
