//! `kemari debug`: low-level operations on this host's Xen ([`kemarid::debug`],
//! [`kemarid::debug_image`]); this file parses their arguments and prints their reports.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use kemarid::debug::{self, SelftestOptions};
use kemarid::debug_image;

use crate::{open_host, pv_cmd, sync_cmd};

#[derive(Subcommand, Debug)]
pub enum DebugCommand {
    /// List the domains of this host (id, type, state, pages, vCPUs).
    Domains,
    #[command(flatten)]
    Sync(crate::sync_cmd::SyncDebug),
    #[command(flatten)]
    Pv(crate::pv_cmd::PvDebug),
    /// Show what an `xl save` image file contains (xl header, domain type, records by type,
    /// pages, pfn range, HVM context, params, emulator blobs). Needs no Xen; exit status 1 on
    /// malformed input.
    StreamInfo {
        /// Image file (written by `xl save` or by Kemari).
        file: std::path::PathBuf,
    },
    /// Pause a domain (Xen's pause count goes up by one).
    Pause {
        /// Domain id or name.
        domain: String,
    },
    /// Unpause a domain.
    Unpause {
        /// Domain id or name.
        domain: String,
    },
    /// Enable log-dirty mode, report the pages the guest dirties per interval, disable it again.
    LogDirty {
        /// Domain id or name (HVM or PVH: classic PV guests have no log-dirty on this Xen).
        domain: String,
        /// Number of rounds after the initial harvest.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Milliseconds between harvests.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
    },
    /// Copy one guest page out (foreign mapping) and print its fingerprint or a hex dump.
    ReadPage {
        /// Domain id or name.
        domain: String,
        /// Guest page frame number (decimal or 0x-prefixed hex).
        pfn: String,
        /// Print a hex dump of the first 256 bytes.
        #[arg(long)]
        hexdump: bool,
    },
    /// Read a xenstore node.
    XsRead {
        /// Absolute xenstore path.
        path: String,
    },
    /// Watch a xenstore path and print events until the timeout passes.
    XsWatch {
        /// Absolute xenstore path (events for descendants are reported too).
        path: String,
        /// Seconds to watch.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Exercise every Xen path the daemon depends on against a running HVM or PVH guest: list,
    /// pause/unpause, HVM context, log-dirty, page mapping, xenstore watch. Exit status 0 only if
    /// all steps pass.
    Selftest {
        /// Domain id or name of a running guest that writes memory.
        domain: String,
        /// Log-dirty rounds.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Milliseconds between log-dirty harvests.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
    },
    /// Write a complete image of an HVM or PVH domain in `xl save` format, restorable by stock
    /// `xl restore`. With --destroy the guest is asked to suspend (like `xl save`), saved and
    /// destroyed; without it the guest is only paused while saved and runs on (such an image
    /// lacks the guest's PV state: see docs/stream.md).
    Save {
        /// Domain id or name.
        domain: String,
        /// Image file to write (created or truncated).
        file: std::path::PathBuf,
        /// Suspend the guest cooperatively and destroy it after the save (`xl save` without -c).
        #[arg(long)]
        destroy: bool,
        /// Name the domain gets in the image's config (default: unchanged).
        #[arg(long)]
        rename: Option<String>,
        /// Seconds the guest may take to suspend.
        #[arg(long, default_value_t = 60)]
        suspend_timeout: u64,
    },
    /// Build a replica domain from an `xl save` image the way the secondary does: `xl restore
    /// -p -e` under NAME (the image's config is renamed through a copy if needed), checked to be
    /// paused. With --unpause the replica is then let run.
    ReplicaRestore {
        /// Image file (`xl save` format).
        image: std::path::PathBuf,
        /// Name of the replica domain.
        name: String,
        /// Unpause the replica once built.
        #[arg(long)]
        unpause: bool,
    },
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

fn stream_info(file: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    let info = kemarid::streaminfo::stream_info(file)?;
    if json {
        print_json(&info)?;
    } else {
        std::io::stdout()
            .lock()
            .write_all(kemarid::streaminfo::render_text(&info).as_bytes())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `kemari debug replica-restore`.
fn replica_restore(
    image: &std::path::Path,
    name: &str,
    unpause: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let host: std::sync::Arc<dyn hypervisor::DomainControl> = std::sync::Arc::new(
        hypervisor::xen::XenHost::open().context("cannot open this host's Xen")?,
    );
    let r = debug_image::replica_restore(host, image, name, unpause)?;
    if json {
        print_json(&r.json())?;
    } else {
        writeln!(std::io::stdout().lock(), "{}", r.line())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs one `kemari debug` command.
pub fn run(cmd: DebugCommand, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        DebugCommand::ReplicaRestore {
            image,
            name,
            unpause,
        } => return replica_restore(&image, &name, unpause, json),
        DebugCommand::StreamInfo { file } => return stream_info(&file, json),
        DebugCommand::Pv(c) => return pv_cmd::run(c),
        _ => {}
    }
    let hv = open_host()?;
    let hv = hv.as_ref();
    let mut out = std::io::stdout().lock();
    match cmd {
        DebugCommand::Sync(c) => return sync_cmd::run_debug(hv, c, json),
        DebugCommand::Pv(c) => return pv_cmd::run(c),
        DebugCommand::StreamInfo { file } => return stream_info(&file, json),
        DebugCommand::ReplicaRestore {
            image,
            name,
            unpause,
        } => return replica_restore(&image, &name, unpause, json),
        DebugCommand::Domains => {
            let rows = debug::domains(hv)?;
            if json {
                print_json(&rows)?;
            } else {
                out.write_all(debug::render_domains(&rows).as_bytes())?;
            }
        }
        DebugCommand::Pause { domain } => pause(&mut out, hv, &domain, true, json)?,
        DebugCommand::Unpause { domain } => pause(&mut out, hv, &domain, false, json)?,
        DebugCommand::LogDirty {
            domain,
            rounds,
            interval_ms,
        } => {
            let id = debug::resolve_domain(hv, &domain)?;
            let r = debug::log_dirty_rounds(hv, id, rounds, Duration::from_millis(interval_ms))?;
            if json {
                print_json(&r)?;
            } else {
                out.write_all(debug::render_dirty_rounds(&r).as_bytes())?;
            }
        }
        DebugCommand::ReadPage {
            domain,
            pfn,
            hexdump,
        } => {
            let id = debug::resolve_domain(hv, &domain)?;
            let pfn = debug::parse_pfn(&pfn)?;
            let page = debug::read_page(hv, id, pfn)?;
            if json {
                let fp = debug::fnv1a64(&page[..]);
                print_json(
                    &serde_json::json!({"domid": id, "pfn": pfn, "fnv1a64": format!("{fp:016x}")}),
                )?;
            } else {
                out.write_all(debug::render_page(id, pfn, &page[..], hexdump).as_bytes())?;
            }
        }
        DebugCommand::XsRead { path } => {
            let s = debug::xs_read(hv, &path)?;
            if json {
                print_json(&serde_json::json!({"path": path, "value": s}))?;
            } else {
                writeln!(out, "{s}")?;
            }
        }
        DebugCommand::XsWatch { path, timeout } => {
            debug::xs_watch(hv, &path, Duration::from_secs(timeout), |ev| {
                if json {
                    print_json(&serde_json::json!({"path": ev.path, "token": ev.token}))
                } else {
                    Ok(writeln!(out, "{}", ev.path)?)
                }
            })?;
        }
        DebugCommand::Selftest {
            domain,
            rounds,
            interval_ms,
        } => {
            let id = debug::resolve_domain(hv, &domain)?;
            let opts = SelftestOptions {
                dirty_interval: Duration::from_millis(interval_ms),
                dirty_rounds: rounds,
                ..SelftestOptions::default()
            };
            let report = debug::selftest(hv, id, &opts);
            if json {
                print_json(&report)?;
            } else {
                out.write_all(debug::render_selftest(id, &report).as_bytes())?;
            }
            if !report.ok {
                return Ok(ExitCode::FAILURE);
            }
        }
        DebugCommand::Save {
            domain,
            file,
            destroy,
            rename,
            suspend_timeout,
        } => {
            let id = debug::resolve_domain(hv, &domain)?;
            let timeout = Duration::from_secs(suspend_timeout);
            let report =
                debug_image::save_to_file(hv, id, &file, destroy, rename.as_deref(), timeout)?;
            if json {
                print_json(&report)?;
            } else {
                writeln!(
                    out,
                    "{}",
                    debug_image::save_line(id, &report, &file, destroy)
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `kemari debug pause` / `unpause`.
fn pause(
    out: &mut impl Write,
    hv: &dyn hypervisor::Hypervisor,
    domain: &str,
    pause: bool,
    json: bool,
) -> anyhow::Result<()> {
    let id = debug::pause_domain(hv, domain, pause)?;
    if json {
        print_json(&serde_json::json!({"domid": id, "paused": pause}))?;
    } else {
        writeln!(
            out,
            "domain {id} {}",
            if pause { "paused" } else { "unpaused" }
        )?;
    }
    Ok(())
}
