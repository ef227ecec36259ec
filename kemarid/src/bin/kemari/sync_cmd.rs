//! `kemari replicate`, `kemari receive` and the sync-related `kemari debug` commands.
//!
//! The sessions themselves are the library's (`kemarid::session::primary`, `secondary`): this
//! parses their arguments, converts them into the sessions' options, runs them in the
//! foreground and prints what they return. They are the lab's handle on the engine and
//! kemarid's workers.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use hypervisor::{DomainControl, Hypervisor};
use kemarid::session::outputs::Device;
use kemarid::session::primary::{self, PrimaryEnd, PrimaryReport};
use kemarid::session::secondary::{self, SecondaryEnd, SecondaryReport};
use kemarid::session::Signals;

use crate::sync_args::{ReceiveArgs, ReplicateArgs, SyncCommand, SyncDebug};
use kemarid::sync::hash::{cpu_hashes, mem_hash};
use kemarid::sync::receiver::read_staged;

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

/// Runs a top-level sync command.
pub fn run(cmd: SyncCommand, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        SyncCommand::Replicate(a) => {
            let status_file = a.status_file.clone();
            report_failure(status_file, replicate(a, json))
        }
        SyncCommand::Receive(a) => {
            let status_file = a.status_file.clone();
            report_failure(status_file, receive(a, json))
        }
        SyncCommand::FenceGuard(a) => crate::fence_cmd::run_guard(a),
        SyncCommand::Protect(mut a) => {
            if a.commit.disk.is_some() {
                let host = hypervisor::xen::XenHost::open()
                    .context("cannot open this host's Xen (run in a Xen 4.17 dom0, as root)")?;
                let domid = kemarid::debug::resolve_domain(&host, &a.domain)?;
                let info = host.domain_info(domid)?;
                anyhow::ensure!(
                    info.paused,
                    "kemari protect: domain {domid} runs: pause it (xl pause) before taking its disk over, so that the copy on the new secondary equals it"
                );
                a.commit.takeover = true;
            }
            replicate(a, json)
        }
    }
}

/// As kemarid's worker: an error that ends the command before it reported an end goes into
/// the status file.
fn report_failure(
    status_file: Option<PathBuf>,
    r: anyhow::Result<ExitCode>,
) -> anyhow::Result<ExitCode> {
    if let (Some(p), Err(e)) = (&status_file, &r) {
        kemarid::daemon::report::mark_failed(p, &format!("{e:#}"));
    }
    r
}

fn replicate(a: ReplicateArgs, json: bool) -> anyhow::Result<ExitCode> {
    let opts = a.options()?;
    let mut printed = Ok(());
    let end = primary::replicate(
        &opts,
        Signals::Process,
        hypervisor::xen::XenHost::open,
        &mut |r| {
            if printed.is_ok() {
                printed = print_primary(&r, json);
            }
        },
    );
    printed?;
    Ok(match end? {
        PrimaryEnd::Replicated => ExitCode::SUCCESS,
        PrimaryEnd::StoppedAfterInitialSync => ExitCode::FAILURE,
    })
}

fn print_primary(r: &PrimaryReport<'_>, json: bool) -> anyhow::Result<()> {
    match r {
        PrimaryReport::Replicated(r) if json => print_json(&r.json())?,
        PrimaryReport::Replicated(r) => println!("{}", r.line()),
        PrimaryReport::Device(_, r) if json => println!("{}", r.json),
        PrimaryReport::Device(Device::Vif, r) => println!("kemari replicate: {}", r.text),
        PrimaryReport::Device(_, r) => println!("{}", r.text),
    }
    Ok(())
}

fn receive(a: ReceiveArgs, json: bool) -> anyhow::Result<ExitCode> {
    let opts = a.options()?;
    let mut printed = Ok(());
    let end = secondary::receive(
        &opts,
        Signals::Process,
        secondary::this_host_xen,
        &mut |r| {
            if printed.is_ok() {
                printed = print_secondary(&r, json);
            }
        },
    );
    printed?;
    Ok(match end? {
        SecondaryEnd::FailedOver | SecondaryEnd::Served { failed: false } => ExitCode::SUCCESS,
        SecondaryEnd::Served { failed: true } => ExitCode::FAILURE,
    })
}

fn print_secondary(r: &SecondaryReport<'_>, json: bool) -> anyhow::Result<()> {
    match r {
        SecondaryReport::Received(r) if json => print_json(&r.json())?,
        SecondaryReport::Received(r) => println!("{}", r.line()),
        SecondaryReport::FailoverDisk(d) if json => print_json(&d.json())?,
        SecondaryReport::FailoverDisk(d) => println!("{}", d.line()),
        SecondaryReport::FailoverVif(r) if json => {
            println!("{}", serde_json::json!({ "vif": r.json }))
        }
        SecondaryReport::FailoverVif(r) => println!("kemari receive: {}", r.text),
    }
    Ok(())
}

/// Runs a sync-related debug command.
pub fn run_debug(hv: &dyn Hypervisor, cmd: SyncDebug, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        SyncDebug::MemHash { domain, per_page } => {
            let domid = kemarid::debug::resolve_domain(hv, &domain)?;
            let max = hv.maximum_gpfn(domid)?;
            let h = mem_hash(hv, domid, max, per_page)?;
            if json {
                print_json(&serde_json::json!({"domid": domid, "max_pfn": max, "mem": h}))?;
            } else {
                println!(
                    "domain {domid}: pages={} holes={} hash={}",
                    h.pages, h.holes, h.hash
                );
                for (pfn, ph) in h.per_page.unwrap_or_default() {
                    println!("{pfn:#x} {ph}");
                }
            }
        }
        SyncDebug::XenMapped { domain } => {
            let domid = kemarid::debug::resolve_domain(hv, &domain)?;
            let max = hv.maximum_gpfn(domid)?;
            let mut bitmap = hypervisor::DirtyBitmap::new(max + 1);
            hv.log_dirty_enable(domid)
                .with_context(|| format!("enabling log-dirty on domain {domid}"))?;
            let r = hv.log_dirty_clean_final(domid, &mut bitmap);
            if let Err(e) = hv.log_dirty_disable(domid) {
                eprintln!("kemari: turning log-dirty off on domain {domid}: {e}");
            }
            r.with_context(|| format!("final log-dirty harvest of domain {domid}"))?;
            let pfns: Vec<u64> = bitmap.iter().collect();
            if json {
                print_json(&serde_json::json!({"domid": domid, "pfns": pfns}))?;
            } else {
                let hex: Vec<String> = pfns.iter().map(|p| format!("{p:#x}")).collect();
                println!("domain {domid}: {} pages: {}", pfns.len(), hex.join(" "));
            }
        }
        SyncDebug::PageDump { domain, pfn } => {
            let domid = kemarid::debug::resolve_domain(hv, &domain)?;
            let pfn = match pfn.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => pfn.parse(),
            }
            .with_context(|| format!("pfn {pfn:?} is not a number"))?;
            let page = kemarid::debug::read_page(hv, domid, pfn)?;
            let mut out = std::io::stdout().lock();
            for (i, line) in page.chunks(16).enumerate() {
                if line.iter().any(|b| *b != 0) {
                    let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
                    writeln!(out, "{:04x}: {}", i * 16, hex.join(" "))?;
                }
            }
        }
        SyncDebug::CpuContext { domain } => {
            let domid = kemarid::debug::resolve_domain(hv, &domain)?;
            let ctx = hv.hvm_context(domid)?;
            print_cpus(&format!("domain {domid}"), &ctx, None, None, json)?;
        }
        SyncDebug::DiskLog { file, replay, vdev } => {
            crate::commit_cmd::disk_log(&file, replay, &vdev, json)?;
        }
        SyncDebug::StagedContext { file } => {
            let staged = read_staged(&file)?;
            print_cpus(
                &file.display().to_string(),
                &staged.hvm_context,
                Some(staged.seq),
                Some(&staged.hvm_params),
                json,
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_cpus(
    what: &str,
    ctx: &[u8],
    seq: Option<u64>,
    params: Option<&[(u32, u64)]>,
    json: bool,
) -> anyhow::Result<()> {
    let cpus = cpu_hashes(ctx)?;
    if json {
        print_json(
            &serde_json::json!({"source": what, "seq": seq, "vcpus": cpus, "params": params}),
        )?;
    } else {
        for c in cpus {
            println!(
                "{what}{}: vcpu {} cpu-hash {} rip {:#x} tsc {}",
                seq.map_or(String::new(), |s| format!(" seq {s}")),
                c.vcpu,
                c.hash,
                c.rip,
                c.tsc
            );
        }
    }
    Ok(())
}
