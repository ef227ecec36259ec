//! Output commit's command line: the arguments of `kemari replicate --disk/--vif` and `kemari
//! receive --disk/--vif` and their conversion into `kemarid::session::outputs`' types (the
//! session, `kemarid::session::primary`, serves them and says what it did). The protected guest's disk and NIC are served by Kemari's blkback and netback
//! in the same process as the sender, each behind an output gate
//! ([`kemarid::session::outputs`]); the checkpoint hook that orders hold, trigger and release
//! is [`kemarid::session::hook`].
//!
//! SIGUSR1 asks for a held stop: the next checkpoint keeps the guest paused after its ACK and
//! protection ends there (the guest stays paused exactly at the state the secondary holds, as
//! with --hold).

use std::path::PathBuf;

use clap::Args;
use kemarid::session::outputs::{self, vdev_to_devid, DiskSpec, OutputsConfig};
use kemarid::sync::disk_apply::ReplicaDisk;

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

impl CommitArgs {
    /// What to serve, `None` without --disk and --vif.
    pub fn config(&self) -> anyhow::Result<Option<OutputsConfig>> {
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
}
