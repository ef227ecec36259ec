//! Prometheus text exposition (format 0.0.4) of the daemon's guests: docs/metrics.md lists
//! every metric.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use super::report::{Histogram, WorkerReport};
use super::Daemon;
use crate::api::GuestState;

/// A label value escaped as the format wants (`\\`, `\"`, `\n`).
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out {
    text: String,
}

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, v: f64) {
        if labels.is_empty() {
            let _ = writeln!(self.text, "{name} {}", fmt(v));
        } else {
            let _ = writeln!(self.text, "{name}{{{labels}}} {}", fmt(v));
        }
    }

    fn histogram(&mut self, name: &str, labels: &str, h: &Histogram) {
        for (le, count) in h.cumulative() {
            let le = le.map_or("+Inf".to_string(), |ms| fmt(ms / 1000.0));
            let _ = writeln!(self.text, "{name}_bucket{{{labels},le=\"{le}\"}} {count}");
        }
        let _ = writeln!(
            self.text,
            "{name}_sum{{{labels}}} {}",
            fmt(h.sum_ms / 1000.0)
        );
        let _ = writeln!(self.text, "{name}_count{{{labels}}} {}", h.count);
    }
}

fn fmt(v: f64) -> String {
    if v.is_finite() {
        let s = format!("{v}");
        s
    } else if v.is_nan() {
        "NaN".into()
    } else if v > 0.0 {
        "+Inf".into()
    } else {
        "-Inf".into()
    }
}

/// The metrics page.
pub fn render(d: &Daemon) -> String {
    let guests: Vec<(
        String,
        String,
        String,
        GuestState,
        Option<WorkerReport>,
        f64,
    )> = d
        .lock()
        .values()
        .map(|g| {
            let s = g.status();
            (
                g.rec.dom.clone(),
                g.rec.role.as_str().to_string(),
                g.rec.peer.clone(),
                g.state,
                g.report.clone(),
                s.replication_lag_ms.unwrap_or(0.0),
            )
        })
        .collect();
    let mut o = Out {
        text: String::new(),
    };
    o.head("kemari_up", "gauge", "1 while kemarid serves.");
    o.sample("kemari_up", "", 1.0);
    o.head(
        "kemari_build_info",
        "gauge",
        "kemarid's version and mode (xen or mem).",
    );
    o.sample(
        "kemari_build_info",
        &format!(
            "version=\"{}\",mode=\"{}\",host=\"{}\"",
            env!("CARGO_PKG_VERSION"),
            d.backend.mode(),
            escape(d.host())
        ),
        1.0,
    );
    o.head(
        "kemari_uptime_seconds",
        "gauge",
        "Seconds since kemarid started.",
    );
    o.sample("kemari_uptime_seconds", "", d.uptime());
    o.head(
        "kemari_failovers_total",
        "counter",
        "Failovers that put a guest on this host since kemarid started (adopted ones included).",
    );
    o.sample(
        "kemari_failovers_total",
        "",
        d.failovers.load(Ordering::Relaxed) as f64,
    );
    let lbl = |dom: &str, role: &str| format!("dom=\"{}\",role=\"{role}\"", escape(dom));
    o.head(
        "kemari_guest_info",
        "gauge",
        "One per guest: its role, peer and state.",
    );
    for (dom, role, peer, state, _, _) in &guests {
        o.sample(
            "kemari_guest_info",
            &format!(
                "{},peer=\"{}\",state=\"{}\"",
                lbl(dom, role),
                escape(peer),
                state.as_str()
            ),
            1.0,
        );
    }
    o.head(
        "kemari_guest_protected",
        "gauge",
        "1 while the guest's checkpoints are acknowledged (state protected), else 0.",
    );
    for (dom, role, _, state, _, _) in &guests {
        o.sample(
            "kemari_guest_protected",
            &lbl(dom, role),
            if *state == GuestState::Protected {
                1.0
            } else {
                0.0
            },
        );
    }
    type Get = fn(&WorkerReport) -> f64;
    let counters: [(&str, &str, &str, Get); 5] = [
        (
            "kemari_checkpoints_total",
            "counter",
            "Checkpoints acknowledged (primary) or applied (secondary).",
            |r| r.checkpoints as f64,
        ),
        (
            "kemari_last_acked_seq",
            "gauge",
            "Sequence number of the last acknowledged checkpoint.",
            |r| r.last_acked_seq.unwrap_or(0) as f64,
        ),
        (
            "kemari_dirty_pages_total",
            "counter",
            "Dirty pages carried by the checkpoints.",
            |r| r.pages as f64,
        ),
        (
            "kemari_bytes_sent_total",
            "counter",
            "Checkpoint bytes sent to the secondary (primary).",
            |r| r.bytes as f64,
        ),
        (
            "kemari_heartbeat_peer_deaths_total",
            "counter",
            "Times the heartbeat declared the peer dead (heartbeat_misses periods in a row unanswered).",
            |r| r.heartbeat_deaths as f64,
        ),
    ];
    for (name, kind, help, get) in counters {
        o.head(name, kind, help);
        for (dom, role, _, _, r, _) in &guests {
            if let Some(r) = r {
                o.sample(name, &lbl(dom, role), get(r));
            }
        }
    }
    o.head(
        "kemari_initial_sync_pages",
        "gauge",
        "Pages sent by the initial copy so far (all live rounds).",
    );
    for (dom, role, _, _, r, _) in &guests {
        if let Some(i) = r.as_ref().and_then(|r| r.initial.as_ref()) {
            o.sample("kemari_initial_sync_pages", &lbl(dom, role), i.pages as f64);
        }
    }
    o.head(
        "kemari_replication_lag_seconds",
        "gauge",
        "Age of the state the secondary holds: seconds since the last acknowledgement (protected guests).",
    );
    for (dom, role, _, state, _, lag) in &guests {
        if *state == GuestState::Protected {
            o.sample(
                "kemari_replication_lag_seconds",
                &lbl(dom, role),
                lag / 1000.0,
            );
        }
    }
    type HistOf = fn(&WorkerReport) -> &Histogram;
    let hists: [(&str, &str, HistOf); 3] = [
        (
            "kemari_checkpoint_pause_seconds",
            "Time the guest was paused per checkpoint (primary).",
            |r| &r.pause,
        ),
        (
            "kemari_checkpoint_latency_seconds",
            "Start of a checkpoint to its acknowledgement (primary).",
            |r| &r.latency,
        ),
        (
            "kemari_ack_wait_seconds",
            "Last byte of a checkpoint sent to its acknowledgement (primary).",
            |r| &r.ack_wait,
        ),
    ];
    for (name, help, get) in hists {
        o.head(name, "histogram", help);
        for (dom, role, _, _, r, _) in &guests {
            if let Some(r) = r.as_ref().filter(|_| role == "primary") {
                o.histogram(name, &lbl(dom, role), get(r));
            }
        }
    }
    o.text
}
