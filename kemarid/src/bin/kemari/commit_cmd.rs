//! Output commit's command line: the arguments of `kemari replicate --disk/--vif` and `kemari
//! receive --disk/--vif`, their conversion into `kemarid::session::outputs`' types, and what
//! is printed. The protected guest's disk and NIC are served by Kemari's blkback and netback
//! in the same process as the sender, each behind an output gate
//! ([`kemarid::session::outputs`]); the checkpoint hook that orders hold, trigger and release
//! is [`kemarid::session::hook`].
//!
//! SIGUSR1 asks for a held stop: the next checkpoint keeps the guest paused after its ACK and
//! protection ends there (the guest stays paused exactly at the state the secondary holds, as
//! with --hold).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use hypervisor::{DomId, Hypervisor};
use kemarid::failover::net::NetSpec;
use kemarid::session::outputs::{
    self, vdev_name, vdev_to_devid, DiskSpec, Outputs, OutputsConfig, Started,
};
use kemarid::sync::disk_apply::ReplicaDisk;
use kemarid::sync::trigger::{Reasons, Triggers};
use nix::sys::signal::{SigSet, Signal};
use xenbus_backend::VifConfig;

/// `kemari replicate` arguments of output commit.
#[derive(Args, Debug, Clone)]
pub struct CommitArgs {
    /// Serve the guest's disk from this raw image (or block device) with Kemari's blkback in
    /// this process, under output commit: writes reach the disk (and the guest sees them done)
    /// only after the secondary ACKed the checkpoint that carries them. The guest must have no
    /// disk of its own at --vdev (create it paused: `xl create -p`).
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Virtual device of --disk in the guest: xvda..xvdp.
    #[arg(long, default_value = "xvda", requires = "disk")]
    pub vdev: String,
    /// Serve the guest's NIC with Kemari's netback in this process, under output commit: the
    /// frames the guest sends reach the tap only after the secondary ACKed a checkpoint at or
    /// after the one that holds the guest state that sent them (with --suspend too); frames for
    /// the guest are delivered at once. Settings as `kemari attach --vif`: mac=..,bridge=..,
    /// devid=N,ifname=NAME,gso=0. The guest must have no vif of its own at that handle.
    #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "SETTINGS")]
    pub vif: Option<String>,
    /// Unpause the guest once the initial sync is ACKed (it is protected from its first
    /// instruction on; the initial copy is then of a paused guest).
    #[arg(long)]
    pub unpause: bool,
    /// Take the disk device over from the process serving it now instead of creating it
    /// (Kemari's `Attached` state: its live ring and in-flight journal, no handshake): set by
    /// `kemari protect` for a guest that a failover left running here.
    #[arg(skip)]
    pub takeover: bool,
    /// Append one line per ACK, shipped disk log and released request or frame to FILE (`T
    /// ack seq=A`, `T ship seq=E entries=N first=F`, `T release dev=D id=I op=O epoch=E acked=A
    /// delay_us=U`, `op=tx` for a frame), each ending in `gate=disk` or `gate=net`: the disk and
    /// the NIC have a gate each (under --suspend the disk's is released at the suspend request,
    /// the NIC's only by the ACK). Needs --disk or --vif.
    #[arg(long)]
    pub commit_log: Option<PathBuf>,
}

/// `kemari receive` arguments of the disk write log.
#[derive(Args, Debug, Clone)]
pub struct ReceiveDiskArgs {
    /// The secondary's copy of the guest's disk (equal to the primary's when protection
    /// starts, e.g. copied while the guest is paused): every checkpoint's disk write log is
    /// applied to it with the checkpoint, all or nothing.
    #[arg(long = "disk")]
    pub disk: Option<PathBuf>,
    /// Virtual device the copy stands for: xvda..xvdp.
    #[arg(long = "vdev", default_value = "xvda")]
    pub vdev: String,
}

impl ReceiveDiskArgs {
    /// The copies for `Receiver::with_disks`.
    pub fn disks(&self) -> anyhow::Result<Vec<ReplicaDisk>> {
        Ok(match &self.disk {
            None => Vec::new(),
            Some(path) => vec![ReplicaDisk {
                devid: vdev_to_devid(&self.vdev)?,
                path: path.clone(),
            }],
        })
    }
}

/// `kemari receive` arguments of the guest's NIC after a failover.
#[derive(Args, Debug, Clone)]
pub struct ReceiveNetArgs {
    /// With --failover: serve the guest's NIC on this host with Kemari's netback (a tap in
    /// bridge=..), so that its netfront reconnects, and announce its MAC there. Settings as
    /// `kemari replicate --vif`; mac= is required and must be the guest's (the one it had on
    /// the primary).
    #[arg(long = "vif", value_name = "SETTINGS")]
    pub vif: Option<String>,
}

impl ReceiveNetArgs {
    /// What to serve after a failover, if anything.
    pub fn spec(&self) -> anyhow::Result<Option<NetSpec>> {
        let Some(s) = &self.vif else {
            return Ok(None);
        };
        let v = crate::attach_cmd::parse_vif_spec(s)?;
        let mac = v.mac.with_context(|| {
            format!("--vif {s:?}: mac= is required (the guest's MAC on the primary)")
        })?;
        let mut vif = VifConfig::new(0, v.devid);
        vif.mac = mac;
        Ok(Some(NetSpec {
            vif,
            tap_name: v.ifname,
            bridge: v.bridge,
            gso: v.gso,
        }))
    }
}

impl CommitArgs {
    /// What to serve, `None` without --disk and --vif.
    fn config(&self) -> anyhow::Result<Option<OutputsConfig>> {
        if self.disk.is_none() && self.vif.is_none() {
            anyhow::ensure!(
                self.commit_log.is_none(),
                "--commit-log needs --disk or --vif"
            );
            return Ok(None);
        }
        let vif = self
            .vif
            .as_deref()
            .map(crate::attach_cmd::parse_vif_spec)
            .transpose()?;
        let disk = match &self.disk {
            None => None,
            Some(image) => Some(DiskSpec {
                image: image.clone(),
                devid: vdev_to_devid(&self.vdev)?,
                takeover: self.takeover,
            }),
        };
        Ok(Some(OutputsConfig {
            disk,
            vif,
            commit_log: self.commit_log.clone(),
        }))
    }
}

/// Creates the disk and/or NIC of `domid` (before the guest runs) behind gates whose taps
/// fire `triggers`, serves each in a thread and says so. `None` without `--disk` and `--vif`.
pub fn start_outputs(
    domid: DomId,
    args: &CommitArgs,
    triggers: &Triggers,
    usr1: &Arc<AtomicBool>,
) -> anyhow::Result<Option<Outputs>> {
    let Some(config) = args.config()? else {
        return Ok(None);
    };
    let outputs = Outputs::start(domid, config, triggers, usr1, &mut |s| match s {
        Started::Disk {
            devid,
            image,
            backend,
        } => eprintln!(
            "kemari replicate: domain {domid} {} served from {} at {backend} under output commit",
            vdev_name(devid),
            image.display()
        ),
        Started::Vif { description } => {
            eprintln!("kemari replicate: domain {domid} {description} under output commit")
        }
    })?;
    Ok(Some(outputs))
}

/// [`Outputs::finish`], printing each device's counters (--json: a line each, the disk
/// first); the first device's error is returned, each is printed.
pub fn finish(outputs: Outputs, held: bool, triggers: &Triggers, json: bool) -> anyhow::Result<()> {
    let ended = outputs.finish(held, triggers, |domid| {
        eprintln!(
            "kemari replicate: protection over: domain {domid} runs unprotected, its devices are served until it is gone or SIGTERM/SIGUSR1"
        )
    });
    let mut first_err = None;
    for (device, r) in ended {
        match r {
            Ok(r) => {
                if json {
                    println!("{}", r.json);
                } else if device == outputs::Device::Vif {
                    println!("kemari replicate: {}", r.text);
                } else {
                    println!("{}", r.text);
                }
            }
            Err(e) => {
                let e = anyhow::Error::from(e);
                eprintln!("kemari replicate: {device}: {e:#}");
                first_err.get_or_insert(e);
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// `--unpause`: unpauses the guest (after the initial sync).
pub fn unpause_if_asked(
    args: &CommitArgs,
    hv: &dyn Hypervisor,
    domid: DomId,
) -> anyhow::Result<()> {
    if args.unpause {
        outputs::unpause(hv, domid)?;
        eprintln!("kemari replicate: domain {domid} unpaused");
    }
    Ok(())
}

/// Blocks SIGUSR1 in the calling thread and every thread it starts later (call first).
pub fn block_usr1() -> anyhow::Result<Arc<AtomicBool>> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGUSR1);
    set.thread_block().context("blocking SIGUSR1")?;
    Ok(Arc::new(AtomicBool::new(false)))
}

/// Waits for SIGUSR1 (blocked by [`block_usr1`]): sets `flag` and requests a checkpoint.
pub fn hold_on_usr1(flag: Arc<AtomicBool>, triggers: Triggers) -> anyhow::Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGUSR1);
    std::thread::Builder::new()
        .name("usr1".into())
        .spawn(move || {
            if set.wait().is_ok() {
                eprintln!("kemari replicate: SIGUSR1: holding the guest at the next checkpoint and stopping there");
                flag.store(true, Ordering::SeqCst);
                triggers.fire(Reasons::REQUEST);
            }
        })
        .context("starting the SIGUSR1 thread")?;
    Ok(())
}

/// `kemari debug disk-log FILE [--replay COPY] [--vdev xvda]`.
pub fn disk_log(
    file: &std::path::Path,
    replay: Option<PathBuf>,
    vdev: &str,
    json: bool,
) -> anyhow::Result<()> {
    use kemari_stream::disklog::DiskOp;
    let (seq, entries) = kemarid::sync::receiver::read_disk_log(file)?;
    let bytes: u64 = entries.iter().map(|e| e.len_bytes()).sum();
    if json {
        let list: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| {
                serde_json::json!({
                    "seq": e.seq,
                    "devid": e.devid,
                    "sector": e.sector,
                    "op": match e.op { DiskOp::Write(_) => "write", DiskOp::Discard { .. } => "discard" },
                    "bytes": e.len_bytes(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"checkpoint": seq, "bytes": bytes, "entries": list})
        );
    } else {
        println!(
            "{}: checkpoint {seq}, {} entries, {bytes} bytes",
            file.display(),
            entries.len()
        );
        for e in &entries {
            let op = match e.op {
                DiskOp::Write(_) => "write",
                DiskOp::Discard { .. } => "discard",
            };
            println!(
                "  {} dev {} {op} sector {} bytes {}",
                e.seq,
                e.devid,
                e.sector,
                e.len_bytes()
            );
        }
    }
    if let Some(path) = replay {
        outputs::replay_disk_log(file, &entries, &path, vdev_to_devid(vdev)?)?;
        eprintln!(
            "replayed {} entries of checkpoint {seq} onto {}",
            entries.len(),
            path.display()
        );
    }
    Ok(())
}

/// After a failover with `--vif`: serves the guest's NIC until the guest is gone or `stop`;
/// returns the line to print with its counters (with --json `{"vif": {...}}`).
pub fn serve_failover_vif(
    vif: xenbus_backend::Vif<'_>,
    stop: &AtomicBool,
    json: bool,
) -> anyhow::Result<String> {
    eprintln!(
        "kemari receive: serving domain {}'s vif {} at {} until the guest is gone or SIGTERM",
        vif.paths().domid,
        vif.config().devid,
        vif.paths().backend
    );
    let r = outputs::serve_failover_vif(vif, stop)?;
    Ok(if json {
        serde_json::json!({ "vif": r.json }).to_string()
    } else {
        format!("kemari receive: {}", r.text)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit_args() -> CommitArgs {
        CommitArgs {
            disk: None,
            vdev: "xvda".into(),
            vif: None,
            unpause: false,
            takeover: false,
            commit_log: None,
        }
    }

    #[test]
    fn commit_args_become_what_to_serve() {
        assert_eq!(commit_args().config().unwrap(), None);
        let a = CommitArgs {
            commit_log: Some("/tmp/c.log".into()),
            ..commit_args()
        };
        let e = a.config().unwrap_err().to_string();
        assert_eq!(e, "--commit-log needs --disk or --vif");
        let a = CommitArgs {
            disk: Some("/img".into()),
            vdev: "xvdb".into(),
            vif: Some("devid=1,gso=0".into()),
            takeover: true,
            ..commit_args()
        };
        let c = a.config().unwrap().unwrap();
        assert_eq!(
            c.disk,
            Some(DiskSpec {
                image: "/img".into(),
                devid: 51728,
                takeover: true
            })
        );
        let vif = c.vif.unwrap();
        assert_eq!((vif.devid, vif.gso), (1, false));
        let a = CommitArgs {
            disk: Some("/img".into()),
            vdev: "sda".into(),
            ..commit_args()
        };
        let e = a.config().unwrap_err().to_string();
        assert_eq!(e, "--vdev \"sda\": expected xvda..xvdp");
    }

    #[test]
    fn receive_vif_needs_the_guests_mac() {
        let a = ReceiveNetArgs {
            vif: Some("bridge=xenbr0".into()),
        };
        let e = a.spec().unwrap_err().to_string();
        assert!(e.contains("mac= is required"), "{e}");
        let a = ReceiveNetArgs {
            vif: Some("mac=00:16:3e:77:00:96,bridge=xenbr0,gso=0,ifname=t1".into()),
        };
        let s = a.spec().unwrap().unwrap();
        assert_eq!(s.vif.mac_string(), "00:16:3e:77:00:96");
        assert_eq!(s.bridge.as_deref(), Some("xenbr0"));
        assert_eq!(s.tap_name.as_deref(), Some("t1"));
        assert!(!s.gso);
        assert!(ReceiveNetArgs { vif: None }.spec().unwrap().is_none());
    }
}
