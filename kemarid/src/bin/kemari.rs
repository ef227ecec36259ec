//! `kemari`: the command-line tool of Kemari for Xen.
//!
//! The operator's verbs (`start`, `stop`, `status`, `failover`, `checkpoint`, `events`) talk to
//! this host's kemarid over its control socket (`kemari/ctl_cmd.rs` over [`kemarid::ctl`],
//! docs/cli.md). The `debug` commands talk to Xen directly (no daemon needed) and prove the FFI
//! on a real dom0;
//! `replicate`/`receive` run the sync engine in the foreground (kemarid's workers run them).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use hypervisor::{Hypervisor, Tx};
use kemarid::debug::{self, SelftestOptions};
use kemarid::qmp::QmpDeviceModel;
use kemarid::xltool::XlTool;
use kemarid::{domconfig, xlsave};

#[path = "kemari/attach_cmd.rs"]
mod attach_cmd;
#[path = "kemari/commit_cmd.rs"]
mod commit_cmd;
#[path = "kemari/ctl_cmd.rs"]
mod ctl_cmd;
#[path = "kemari/fence_cmd.rs"]
mod fence_cmd;
#[path = "kemari/pv_cmd.rs"]
mod pv_cmd;
#[path = "kemari/sync_cmd.rs"]
mod sync_cmd;

/// Kemari for Xen: fault tolerance for Xen 4.17 HVM and PVH guests.
///
/// Protect guests through this host's kemarid (start, stop, status, failover, checkpoint,
/// events: exit status 0 on success, 1 on failure, 2 on a usage error; docs/cli.md); run the
/// sync engine in the foreground (replicate/receive); serve a guest's disk and NIC (attach);
/// low-level Xen operations (debug).
#[derive(Parser, Debug)]
#[command(name = "kemari", version, about, long_about)]
struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    #[command(flatten)]
    Ctl(ctl_cmd::CtlCommand),
    /// Low-level operations on this host's Xen, run in dom0 as root. They talk to Xen directly
    /// through libxenctrl & co (Xen 4.17 only) and need no daemon.
    #[command(subcommand)]
    Debug(DebugCommand),
    #[command(flatten)]
    Sync(sync_cmd::SyncCommand),
    /// Serve a disk image (userspace blkback) and/or a NIC on a dom0 tap (userspace netback) to
    /// a guest (foreground): creates the device nodes for a guest created paused without them
    /// (`xl create -p`), optionally unpauses it, and serves until the guest is gone or
    /// SIGINT/SIGTERM (docs/backends.md).
    Attach(attach_cmd::AttachArgs),
}

#[derive(Subcommand, Debug)]
enum DebugCommand {
    /// List the domains of this host (id, type, state, pages, vCPUs).
    Domains,
    #[command(flatten)]
    Sync(sync_cmd::SyncDebug),
    #[command(flatten)]
    Pv(pv_cmd::PvDebug),
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

fn parse_pfn(s: &str) -> anyhow::Result<u64> {
    let r = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.with_context(|| format!("pfn {s:?} is not a number (decimal or 0x-prefixed hex)"))
}

fn open_host() -> anyhow::Result<Box<dyn Hypervisor>> {
    let host = hypervisor::xen::XenHost::open()
        .context("cannot open this host's Xen (kemari debug runs in a Xen 4.17 dom0, as root)")?;
    Ok(Box::new(host))
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
    use kemarid::sync::replica::ReplicaBuilder;
    let host: std::sync::Arc<dyn hypervisor::DomainControl> = std::sync::Arc::new(
        hypervisor::xen::XenHost::open().context("cannot open this host's Xen")?,
    );
    let builder =
        kemarid::sync::replica_xl::XlReplicaBuilder::new(XlTool::default(), Some(host.clone()));
    let start = std::time::Instant::now();
    let domid = builder.create_paused(image, name)?;
    let build_ms = start.elapsed().as_millis() as u64;
    if unpause {
        host.unpause(domid)
            .with_context(|| format!("unpausing replica domain {domid}"))?;
    }
    if json {
        print_json(
            &serde_json::json!({"domid": domid, "name": name, "build_ms": build_ms, "unpaused": unpause}),
        )?;
    } else {
        writeln!(
            std::io::stdout().lock(),
            "replica {name} built as domain {domid} in {build_ms} ms{}",
            if unpause { ", unpaused" } else { ", paused" }
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn run_debug(cmd: DebugCommand, json: bool) -> anyhow::Result<ExitCode> {
    if let DebugCommand::ReplicaRestore {
        image,
        name,
        unpause,
    } = &cmd
    {
        return replica_restore(image, name, *unpause, json);
    }
    if let DebugCommand::StreamInfo { file } = &cmd {
        return stream_info(file, json);
    }
    if let DebugCommand::Pv(c) = cmd {
        return pv_cmd::run(c);
    }
    let hv = open_host()?;
    let hv = hv.as_ref();
    let mut out = std::io::stdout().lock();
    match cmd {
        DebugCommand::Sync(c) => return sync_cmd::run_debug(hv, c, json),
        DebugCommand::Pv(c) => return pv_cmd::run(c),
        DebugCommand::StreamInfo { file } => return stream_info(&file, json),
        DebugCommand::Domains => {
            let rows = debug::domains(hv)?;
            if json {
                print_json(&rows)?;
            } else {
                writeln!(
                    out,
                    "{:>5}  {:<4}  {:<16}  {:>10}  {:>5}",
                    "ID", "TYPE", "STATE", "PAGES", "VCPUS"
                )?;
                for r in rows {
                    writeln!(
                        out,
                        "{:>5}  {:<4}  {:<16}  {:>10}  {:>5}",
                        r.domid, r.guest_type, r.state, r.tot_pages, r.vcpus
                    )?;
                }
            }
        }
        DebugCommand::Pause { domain } => {
            let id = debug::resolve_domain(hv, &domain)?;
            hv.pause(id)
                .with_context(|| format!("pausing domain {domain}"))?;
            if json {
                print_json(&serde_json::json!({"domid": id, "paused": true}))?;
            } else {
                writeln!(out, "domain {id} paused")?;
            }
        }
        DebugCommand::Unpause { domain } => {
            let id = debug::resolve_domain(hv, &domain)?;
            hv.unpause(id)
                .with_context(|| format!("unpausing domain {domain}"))?;
            if json {
                print_json(&serde_json::json!({"domid": id, "paused": false}))?;
            } else {
                writeln!(out, "domain {id} unpaused")?;
            }
        }
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
                for (i, round) in r.iter().enumerate() {
                    writeln!(
                        out,
                        "round {}: {} dirty pages in {} ms",
                        i + 1,
                        round.dirty_pages,
                        round.interval_ms
                    )?;
                }
            }
        }
        DebugCommand::ReadPage {
            domain,
            pfn,
            hexdump,
        } => {
            let id = debug::resolve_domain(hv, &domain)?;
            let pfn = parse_pfn(&pfn)?;
            let page = debug::read_page(hv, id, pfn)?;
            let fp = debug::fnv1a64(&page[..]);
            if json {
                print_json(
                    &serde_json::json!({"domid": id, "pfn": pfn, "fnv1a64": format!("{fp:016x}")}),
                )?;
            } else {
                writeln!(out, "domain {id} pfn {pfn:#x}: fnv1a64 {fp:016x}")?;
                if hexdump {
                    for (i, chunk) in page[..256].chunks(16).enumerate() {
                        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
                        writeln!(out, "{:04x}: {}", i * 16, hex.join(" "))?;
                    }
                }
            }
        }
        DebugCommand::XsRead { path } => {
            let xs = hv.open_xenstore()?;
            let v = xs.read(Tx::NONE, &path)?;
            let s = String::from_utf8_lossy(&v);
            if json {
                print_json(&serde_json::json!({"path": path, "value": s}))?;
            } else {
                writeln!(out, "{s}")?;
            }
        }
        DebugCommand::XsWatch { path, timeout } => {
            let xs = hv.open_xenstore()?;
            let token = format!("kemari-{}", std::process::id());
            xs.watch(&path, &token)?;
            let deadline = std::time::Instant::now() + Duration::from_secs(timeout);
            loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                if let Some(ev) = xs.read_watch(Some(left))? {
                    if json {
                        print_json(&serde_json::json!({"path": ev.path, "token": ev.token}))?;
                    } else {
                        writeln!(out, "{}", ev.path)?;
                    }
                }
            }
            xs.unwatch(&path, &token)?;
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
                for s in &report.steps {
                    writeln!(
                        out,
                        "{:<16} {:<4} {:>6} ms  {}",
                        s.step,
                        if s.ok { "ok" } else { "FAIL" },
                        s.millis,
                        s.detail
                    )?;
                }
                writeln!(
                    out,
                    "selftest of domain {id}: {}",
                    if report.ok { "PASS" } else { "FAIL" }
                )?;
            }
            if !report.ok {
                return Ok(ExitCode::FAILURE);
            }
        }
        DebugCommand::ReplicaRestore {
            image,
            name,
            unpause,
        } => return replica_restore(&image, &name, unpause, json),
        DebugCommand::Save {
            domain,
            file,
            destroy,
            rename,
            suspend_timeout,
        } => {
            let id = debug::resolve_domain(hv, &domain)?;
            let report = save_to_file(hv, id, &file, destroy, rename.as_deref(), suspend_timeout)?;
            if json {
                print_json(&report)?;
            } else {
                writeln!(
                    out,
                    "domain {id} ({}) saved to {}: {} bytes, {} pages, {} of {} frames unpopulated, device state {} bytes; quiesce {} ms, memory {} ms, total {} ms{}",
                    report.guest_type,
                    file.display(),
                    report.image_bytes,
                    report.pages,
                    report.holes,
                    report.pfns_scanned,
                    report.device_state_bytes,
                    report.quiesce_ms,
                    report.memory_ms,
                    report.total_ms,
                    if destroy { "; domain destroyed" } else { "; domain runs on" }
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `kemari debug save`: the image of `id` into `file`, then (with `destroy`) `xl destroy`.
fn save_to_file(
    hv: &dyn Hypervisor,
    id: hypervisor::DomId,
    file: &std::path::Path,
    destroy: bool,
    rename: Option<&str>,
    suspend_timeout: u64,
) -> anyhow::Result<xlsave::SaveReport> {
    let xs = hv.open_xenstore()?;
    let config = domconfig::domain_config_json(id, Some(xs.as_ref()), rename)?;
    let info = hv.domain_info(id)?;
    let dm = QmpDeviceModel::for_domain(id);
    let emulator: Option<&dyn xlsave::EmulatorState> =
        (info.guest_type == hypervisor::GuestType::Hvm).then_some(&dm);
    let out = std::fs::File::create(file)
        .with_context(|| format!("cannot create image file {}", file.display()))?;
    let opts = xlsave::SaveOptions {
        mode: if destroy {
            xlsave::SaveMode::Suspend
        } else {
            xlsave::SaveMode::Pause
        },
        suspend_timeout: Duration::from_secs(suspend_timeout),
    };
    let report = match xlsave::save_image(hv, id, &out, &config, emulator, &opts) {
        Ok(r) => r,
        Err(err) => {
            drop(out);
            let _ = std::fs::remove_file(file);
            // A guest that did suspend cannot be resumed by kemari (no xc_domain_resume): say so.
            let suspended = hv.domain_info(id).ok().and_then(|i| i.shutdown)
                == Some(hypervisor::ShutdownReason::Suspend);
            let what = if suspended {
                format!(
                    "saving domain {id} to {} (the domain stays suspended: destroy it with xl destroy {id})",
                    file.display()
                )
            } else {
                format!("saving domain {id} to {}", file.display())
            };
            return Err(err).context(what);
        }
    };
    out.sync_all()
        .with_context(|| format!("cannot sync image file {}", file.display()))?;
    if destroy {
        XlTool::default().destroy(id).with_context(|| {
            format!(
                "domain {id} is saved in {} but could not be destroyed",
                file.display()
            )
        })?;
    }
    Ok(report)
}

fn main() -> ExitCode {
    if let Some(code) = kemarid::manpage::write_if_requested(Cli::command(), "1") {
        return code;
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Ctl(cmd) => Ok(ctl_cmd::run(cmd, cli.json)),
        Command::Debug(cmd) => run_debug(cmd, cli.json),
        Command::Sync(cmd) => sync_cmd::run(cmd, cli.json),
        Command::Attach(args) => {
            open_host().and_then(|hv| attach_cmd::run(hv.as_ref(), args, cli.json))
        }
    };
    match r {
        Ok(code) => code,
        // `kemari debug domains | head`: the reader went away; that is not our failure.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kemari: {e:#}");
            ExitCode::FAILURE
        }
    }
}
