//! `kemari debug`: low-level operations on this host's Xen ([`kemarid::debug`],
//! [`kemarid::debug_image`]); this file parses their arguments and prints their reports.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use kemarid::debug::{self, SelftestOptions};
use kemarid::debug_image;

use crate::{open_host, pv_cmd, sync_cmd, DebugCommand};

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
