//! `kemari debug pv-capture` / `pv-resurrect`: the transparent-failover experiment's handles
//! (docs/failover.md section 9). The logic is `kemarid::failover::{pvstate, transparent}`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use hypervisor::xen::XenHost;
use kemarid::failover::pvstate::{self, PvState};
use kemarid::failover::transparent::{self, HypercallInsn};
use kemarid::sync::receiver::read_staged;

/// PV-state `kemari debug` commands.
#[derive(Subcommand, Debug)]
pub enum PvDebug {
    /// Print the PV state Xen keeps outside a paused guest's memory as JSON: its ports,
    /// callback parameter, shared_info frame, and the vcpu_info / FIFO frames found in its RAM.
    PvCapture {
        /// Domain id or name (paused).
        domain: String,
    },
    /// Rebuild that PV state in a paused replica (a stub run in its vCPU 0), load the staged
    /// context of its last checkpoint and unpause it: transparent failover in place.
    PvResurrect {
        /// The replica's domain id or name.
        domain: String,
        /// `kemari debug pv-capture` output of the guest.
        #[arg(long)]
        pv: PathBuf,
        /// The replica's staged state (`SPOOL/staged.kemari`).
        #[arg(long)]
        staged: PathBuf,
        /// Leave it paused.
        #[arg(long)]
        keep_paused: bool,
    },
}

/// Runs one of them.
pub fn run(cmd: PvDebug) -> anyhow::Result<ExitCode> {
    let host = XenHost::open().context("cannot open this host's Xen")?;
    match cmd {
        PvDebug::PvCapture { domain } => {
            let domid = kemarid::debug::resolve_domain(&host, &domain)?;
            let shinfo = host.shared_info_frame(domid)?;
            // Xen's system time is a few seconds ahead of dom0's uptime; the guest ran moments
            // ago, so its vcpu_info was written within the last few minutes.
            let up = std::fs::read_to_string("/proc/uptime").context("reading /proc/uptime")?;
            let secs: f64 = up
                .split_whitespace()
                .next()
                .and_then(|s| s.parse().ok())
                .context("parsing /proc/uptime")?;
            let window = (
                ((secs - 300.0).max(0.0) * 1e9) as u64,
                ((secs + 120.0) * 1e9) as u64,
            );
            let state = pvstate::capture(&host, domid, shinfo, window)?;
            println!("{}", serde_json::to_string_pretty(&state)?);
        }
        PvDebug::PvResurrect {
            domain,
            pv,
            staged,
            keep_paused,
        } => {
            let domid = kemarid::debug::resolve_domain(&host, &domain)?;
            let text = std::fs::read_to_string(&pv)
                .with_context(|| format!("reading {}", pv.display()))?;
            let state = PvState::from_json(&text)?;
            let staged = read_staged(&staged)?;
            let cpuinfo =
                std::fs::read_to_string("/proc/cpuinfo").context("reading /proc/cpuinfo")?;
            let insn = HypercallInsn::from_cpuinfo(&cpuinfo)
                .context("unknown CPU vendor in /proc/cpuinfo")?;
            let report =
                transparent::resurrect(&host, &host, domid, &staged, &state, insn, keep_paused)?;
            println!("{}", serde_json::to_string(&report)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}
