//! The text `kemari start/stop/status/failover/checkpoint/events` print: pure functions from
//! the daemon's replies to lines (docs/cli.md; tests/kemari_cli.rs and the lab read them).

use crate::api::{self, CheckpointReply, Event, EventKind, GuestState, GuestStatus, StatusReply};

/// A value, or `-` when there is none.
pub fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// 1234567 -> "1.2M", 4321 -> "4.3k", 12.5 -> "12.5", 3 -> "3".
pub fn fmt_count(v: f64) -> String {
    if v >= 1e9 {
        format!("{:.1}G", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if v.fract() == 0.0 || v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Bytes per second in binary units: "0 B/s", "512 B/s", "1.5 MiB/s".
pub fn fmt_rate(bytes_per_s: f64) -> String {
    const UNITS: [&str; 5] = ["B/s", "KiB/s", "MiB/s", "GiB/s", "TiB/s"];
    let mut v = bytes_per_s.max(0.0);
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// Milliseconds: "0.42ms", "12.3ms", "1.5s".
pub fn fmt_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.1}s", ms / 1000.0)
    } else if ms >= 10.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{ms:.2}ms")
    }
}

/// Seconds: "42s", "3m05s", "2h07m".
pub fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// The HEARTBEAT column: `off`, the peer's state, and how long ago it was last heard.
pub fn heartbeat_cell(g: &GuestStatus) -> String {
    match &g.heartbeat {
        None => "off".to_string(),
        Some(h) => match h.last_heard_ms {
            Some(ms) => format!("{} ({} ago)", h.peer, fmt_ms(ms)),
            None => h.peer.clone(),
        },
    }
}

/// The status table's column titles.
pub const COLUMNS: [&str; 12] = [
    "GUEST",
    "ROLE",
    "PEER",
    "STATE",
    "CKPT/S",
    "LAST-ACK",
    "PAUSE p50/p99",
    "DIRTY/CKPT",
    "LAG",
    "LINK",
    "HEARTBEAT",
    "DOMID",
];

/// One guest's cells of the status table, in [`COLUMNS`] order.
pub fn status_row(g: &GuestStatus) -> [String; 12] {
    let primary = g.role == api::Role::Primary;
    [
        g.dom.clone(),
        g.role.as_str().to_string(),
        g.peer.clone(),
        g.state.as_str().to_string(),
        format!("{:.1}", g.checkpoints_per_s),
        opt(g.last_acked_seq),
        if primary && g.checkpoints > 0 {
            format!("{}/{}", fmt_ms(g.pause_ms.p50), fmt_ms(g.pause_ms.p99))
        } else {
            "-".to_string()
        },
        fmt_count(g.dirty_pages_per_checkpoint),
        g.replication_lag_ms.map_or_else(|| "-".to_string(), fmt_ms),
        fmt_rate(g.link_bytes_per_s),
        heartbeat_cell(g),
        opt(g.domid),
    ]
}

/// The status table (one row per guest, columns sized to their content) and, under it, a
/// line for each guest in its initial sync or with an error.
pub fn render_status(st: &StatusReply) -> String {
    if st.guests.is_empty() {
        return format!("kemarid on {}: no protected guests\n", st.host);
    }
    let rows: Vec<[String; 12]> = st.guests.iter().map(status_row).collect();
    let mut widths = COLUMNS.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(widths.iter()).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(&COLUMNS.map(str::to_string));
    for r in &rows {
        out.push_str(&line(r));
    }
    for g in &st.guests {
        if let Some(s) = g.initial_sync.as_ref().filter(|s| !s.done) {
            let pct = if s.total > 0 {
                100.0 * s.pages.min(s.total) as f64 / s.total as f64
            } else {
                0.0
            };
            out.push_str(&format!(
                "{}: initial sync {pct:.0}% ({} of {} pages, {} pages/s, round {}, ETA {})\n",
                g.dom,
                s.pages,
                s.total,
                fmt_count(s.rate_pages_per_s),
                s.round,
                s.eta_s.map_or_else(|| "-".to_string(), fmt_secs)
            ));
        }
        if let Some(e) = &g.error {
            out.push_str(&format!("{}: error: {e}\n", g.dom));
        }
    }
    out
}

/// Unix time -> "YYYY-MM-DDTHH:MM:SS.mmmZ" (UTC).
pub fn fmt_time(t: f64) -> String {
    let ms_total = (t.max(0.0) * 1000.0).round() as i64;
    let (secs, ms) = (ms_total.div_euclid(1000), ms_total.rem_euclid(1000));
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
}

/// One event as a line of text: time, guest, kind, details.
pub fn render_event(ev: &Event) -> String {
    let detail = match &ev.kind {
        EventKind::State { from, to, reason } => format!(
            "state {} -> {}: {reason}",
            from.map_or("(new)", |f| f.as_str()),
            to.as_str()
        ),
        EventKind::InitialSync {
            pages,
            total,
            rate_pages_per_s,
        } => format!(
            "initial-sync {pages}/{total} pages, {} pages/s",
            fmt_count(*rate_pages_per_s)
        ),
        EventKind::Checkpoints {
            last_acked_seq,
            checkpoints,
            per_s,
        } => format!(
            "checkpoints last ACKed sequence {last_acked_seq}, {checkpoints} in total, {per_s:.1}/s"
        ),
        EventKind::Heartbeat { peer } => format!("heartbeat peer {peer}"),
        EventKind::FailedOver { domid, seq } => format!(
            "failed-over runs here{} from checkpoint {}",
            domid.map(|d| format!(" as domain {d}")).unwrap_or_default(),
            opt(*seq)
        ),
        EventKind::WorkerExit { pid, code } => match code {
            Some(c) => format!("worker-exit pid {pid} exited with status {c}"),
            None => format!("worker-exit pid {pid} killed by a signal"),
        },
        EventKind::Adopted { pid } => format!("adopted worker pid {pid}"),
    };
    format!("{} {} {detail}", fmt_time(ev.time), ev.dom)
}

/// `kemari start`'s line: protected (with the initial sync's figures), or still starting.
pub fn start_line(g: &GuestStatus) -> String {
    match g.state {
        GuestState::Protected => format!(
            "{}: protected, replica on {} ({}{} checkpoints, last ACKed sequence {})",
            g.dom,
            g.peer,
            g.initial_sync
                .as_ref()
                .map(|s| format!("initial sync {} pages in {} rounds; ", s.pages, s.round + 1))
                .unwrap_or_default(),
            g.checkpoints,
            opt(g.last_acked_seq)
        ),
        s => format!(
            "{}: protection starting, replica on {} (state {}); follow it with `kemari status {}`",
            g.dom,
            g.peer,
            s.as_str(),
            g.dom
        ),
    }
}

/// The message of `start`'s progress bar: rate, live round, ETA.
pub fn sync_bar_message(s: &api::InitialSync) -> String {
    let eta = match s.eta_s {
        Some(e) => format!("ETA {}", fmt_secs(e)),
        None if s.done => "acknowledged".to_string(),
        None if s.round > 0 => "converging".to_string(),
        None => "ETA -".to_string(),
    };
    format!(
        "{}/s, round {}, {eta}",
        fmt_count(s.rate_pages_per_s),
        s.round
    )
}

/// What `stop` did, by the guest's role and its state afterwards.
pub fn stop_text(role: api::Role, state: GuestState) -> &'static str {
    use api::Role::{Primary, Secondary};
    match (role, state) {
        (_, GuestState::Stopping) => "stopping (the checkpoint in progress completes)",
        (Primary, GuestState::Stopped) => "protection stopped; the guest runs on here unprotected",
        (Secondary, GuestState::Stopped) => "replica dropped",
        (_, GuestState::FailedOver) => {
            "record cleared; the guest runs here since its failover, unprotected"
        }
        (Primary, GuestState::Failed) => {
            "record cleared; protection had failed, the guest runs on here unprotected"
        }
        (Secondary, GuestState::Failed) => "record cleared; protection had failed",
        _ => "stop asked",
    }
}

/// `kemari stop`'s line.
pub fn stop_line(g: &GuestStatus) -> String {
    format!(
        "{}: {} (role {}, peer {}, state {})",
        g.dom,
        stop_text(g.role, g.state),
        g.role.as_str(),
        g.peer,
        g.state.as_str()
    )
}

/// `kemari failover`'s line: the guest runs on `host`.
pub fn failover_line(g: &GuestStatus, host: &str) -> String {
    format!(
        "{}: runs on {host}{} from checkpoint {} (state {}); it is not protected now",
        g.dom,
        g.domid
            .map(|d| format!(" as domain {d}"))
            .unwrap_or_default(),
        opt(g.last_acked_seq),
        g.state.as_str()
    )
}

/// `kemari checkpoint`'s line.
pub fn checkpoint_line(c: &CheckpointReply) -> String {
    format!(
        "{}: checkpoint acknowledged, sequence {}",
        c.dom, c.acked_seq
    )
}
