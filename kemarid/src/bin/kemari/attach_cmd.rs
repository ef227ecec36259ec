//! `kemari attach`: serve a disk (userspace blkback) and/or a NIC (userspace netback) to a guest
//! (foreground): the arguments, and the lines printed; the work is [`kemarid::attach`]'s (the
//! devices' xenstore nodes, optional unpause, serving the rings until the guest is gone or
//! SIGINT/SIGTERM arrives). See docs/backends.md.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use hypervisor::Hypervisor;
use kemarid::attach::{self, DiskArgs};
use kemarid::debug;
use kemarid::session::outputs::{create_vif, describe_vif, vdev_to_devid};
use xenbus_backend::{VbdStatus, VifStatus};

/// `--vif` settings (also `kemari replicate`'s and `kemari receive`'s).
pub(crate) use kemarid::attach::parse_vif_spec;

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

/// Prints one line on stdout, flushed.
fn print_line(line: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

/// Prints a report: JSON with --json, else its text line.
fn print_report(json: bool, v: serde_json::Value, line: String) -> anyhow::Result<()> {
    if json {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, &v)?;
        writeln!(out)?;
    } else {
        println!("{line}");
    }
    Ok(())
}

/// Runs `kemari attach`.
pub fn run(hv: &dyn Hypervisor, args: AttachArgs, json: bool) -> anyhow::Result<ExitCode> {
    let vif_spec = args.vif.as_deref().map(parse_vif_spec).transpose()?;
    let stop = attach::stop_on_signals()?;
    let domid = debug::resolve_domain(hv, &args.domain)?;
    let devid = vdev_to_devid(&args.vdev)?;
    let disk = args.disk.as_ref().map(|image| DiskArgs {
        domid,
        vdev: args.vdev.clone(),
        devid,
        image: image.clone(),
        readonly: args.readonly,
        takeover: args.takeover,
    });
    let mut vbd = match &disk {
        None => None,
        Some(d) => {
            let vbd = attach::open_disk(hv, d)?;
            print_line(&attach::disk_ready_line(d, &vbd))?;
            Some(vbd)
        }
    };
    let vif = match &vif_spec {
        None => None,
        Some(spec) => {
            let vif = create_vif(hv, domid, spec)?;
            print_line(&format!(
                "kemari attach: domain {domid} {}, state {}",
                describe_vif(&vif, spec, true),
                vif.state()
            ))?;
            Some(vif)
        }
    };
    let t0 = Instant::now();
    if args.unpause {
        attach::unpause(hv, domid)?;
    }
    let served = attach::serve(vbd.as_mut(), vif, &stop);
    let secs = t0.elapsed().as_secs_f64();
    let mut failed = false;
    if let (Some(vbd), Some(status)) = (&vbd, served.disk) {
        let status = status?;
        failed |= matches!(status, VbdStatus::Failed(_));
        let s = vbd.stats();
        print_report(
            json,
            attach::disk_report_json(domid, devid, &status, secs, s),
            attach::disk_report_line(domid, &args.vdev, &status, secs, s),
        )?;
    }
    if let Some(done) = served.vif {
        let done = done?;
        failed |= matches!(done.status, VifStatus::Failed(_));
        print_report(
            json,
            attach::vif_report_json(domid, &done, secs),
            attach::vif_report_line(domid, &done, secs),
        )?;
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
