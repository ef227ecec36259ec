//! `kemari debug stream-info FILE`: what an `xl save` image (Xen's or ours) contains.
//!
//! Reads the file record by record with [`kemari_stream::image::summarize`] (bounded memory:
//! pages are hashed as they pass, never kept) and reports the xl header, domain type, records by
//! type, pages, pfn range, HVM context records, HVM params and emulator blobs.

use std::fmt::Write as _;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use kemari_stream::image::{self, ImageError, ImageSummary};
use kemari_stream::Limits;
use serde::Serialize;
use thiserror::Error;

/// Errors of `stream-info`.
#[derive(Debug, Error)]
pub enum StreamInfoError {
    /// The file could not be opened.
    #[error("cannot open {path}: {error}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
    },
    /// The file is not a valid image.
    #[error("{path} is not a valid xl save image: {error}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        error: ImageError,
    },
}

/// The report: the image summary plus a fingerprint of all page contents.
#[derive(Debug, Clone, Serialize)]
pub struct StreamInfo {
    /// The file.
    pub file: PathBuf,
    /// What the image contains.
    #[serde(flatten)]
    pub summary: ImageSummary,
    /// FNV-1a 64 over every (pfn, page) in stream order, hex.
    pub pages_fnv1a64: String,
}

/// Reads `path` and summarizes it.
pub fn stream_info(path: &Path) -> Result<StreamInfo, StreamInfoError> {
    let f = File::open(path).map_err(|source| StreamInfoError::Open {
        path: path.to_owned(),
        error: source,
    })?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut mix = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    let summary = image::summarize(
        BufReader::with_capacity(1 << 20, f),
        Limits::default(),
        &mut |pfn, data| {
            mix(&pfn.to_le_bytes());
            mix(data);
        },
    )
    .map_err(|source| StreamInfoError::Malformed {
        path: path.to_owned(),
        error: source,
    })?;
    Ok(StreamInfo {
        file: path.to_owned(),
        summary,
        pages_fnv1a64: format!("{h:016x}"),
    })
}

/// Human-readable rendering of a report.
pub fn render_text(info: &StreamInfo) -> String {
    let s = &info.summary;
    let mut o = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(o, "file:            {}", info.file.display());
    let _ = writeln!(o, "bytes:           {}", s.total_bytes);
    let _ = writeln!(
        o,
        "xl header:       mandatory {:#x} optional {:#x}, config {} bytes{}{}",
        s.xl_mandatory_flags,
        s.xl_optional_flags,
        s.config_len,
        if s.config_is_json { " (JSON)" } else { "" },
        s.config_name
            .as_ref()
            .map(|n| format!(", name {n:?}"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        o,
        "guest:           {} (libxc domain type {:?}, page shift {}, saved on Xen {}.{}, libxc stream v{}, libxl options {:#x})",
        s.guest_kind,
        s.domain.domain_type,
        s.domain.page_shift,
        s.domain.xen_major,
        s.domain.xen_minor,
        s.libxc_version,
        s.libxl_options
    );
    let p = &s.pages;
    let range = match (p.pfn_min, p.pfn_max) {
        (Some(a), Some(b)) => format!("pfn {a:#x}..={b:#x}"),
        _ => "no pfns".into(),
    };
    let data_range = match (p.data_pfn_min, p.data_pfn_max) {
        (Some(a), Some(b)) => format!(", with data {a:#x}..={b:#x}"),
        _ => String::new(),
    };
    let _ = writeln!(
        o,
        "pages:           {} with data ({} MiB), {} entries in {} PAGE_DATA records (max {} per record), {range}{data_range}",
        p.with_data,
        p.with_data * 4096 / (1 << 20),
        p.entries,
        p.records,
        p.max_per_record
    );
    for (t, n) in &p.by_type {
        let _ = writeln!(o, "  type {t:<10} {n}");
    }
    let _ = writeln!(o, "pages fnv1a64:   {}", info.pages_fnv1a64);
    let _ = writeln!(o, "records:");
    for (name, st) in &s.records {
        let _ = writeln!(o, "  {name:<36} {:>8} x {:>12} bytes", st.count, st.bytes);
    }
    for (i, c) in s.hvm_contexts.iter().enumerate() {
        let recs: Vec<String> = c.records.iter().map(|(k, v)| format!("{k}x{v}")).collect();
        let _ = writeln!(
            o,
            "HVM context {i}:   {} bytes, {} CPU records; {}{}",
            c.len,
            c.cpus,
            recs.join(" "),
            c.parse_error
                .as_ref()
                .map(|e| format!(" (unparsable: {e})"))
                .unwrap_or_default()
        );
    }
    if let Some(t) = &s.tsc_info {
        let _ = writeln!(
            o,
            "TSC info:        mode {} khz {} nsec {} incarnation {}",
            t.mode, t.khz, t.nsec, t.incarnation
        );
    }
    let params: Vec<String> = s
        .hvm_params
        .iter()
        .map(|(i, v)| format!("{i}={v:#x}"))
        .collect();
    let _ = writeln!(
        o,
        "HVM params:      {} [{}]",
        params.len(),
        params.join(" ")
    );
    for e in &s.emulator_contexts {
        let _ = writeln!(
            o,
            "emulator ctx:    id {} index {}: {} bytes",
            e.id, e.index, e.len
        );
    }
    for e in &s.emulator_xenstore {
        let _ = writeln!(
            o,
            "emulator xs:     id {} index {}: {} bytes",
            e.id, e.index, e.len
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use kemari_stream::image::{GuestKind, ImageSpec, ImageWriter};
    use kemari_stream::PAGE_SIZE;

    fn tmpfile(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kemari-streaminfo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn reports_an_hvm_image_and_rejects_a_truncated_one() {
        let spec = ImageSpec {
            kind: GuestKind::Hvm,
            config_json: br#"{"c_info":{"type":"hvm","name":"t"}}"#.to_vec(),
            xen_major: 4,
            xen_minor: 17,
            cpuid_policy: None,
            msr_policy: None,
        };
        let page = [1u8; PAGE_SIZE];
        let mut w = ImageWriter::new(Vec::new(), &spec, Limits::default()).unwrap();
        w.write_pages(&[(0x100, &page), (0x101, &page)]).unwrap();
        // HEADER, one CPU, END.
        let mut ctx = Vec::new();
        for (t, len) in [(1u16, 8u32), (2, 16), (0, 0)] {
            ctx.extend_from_slice(&t.to_le_bytes());
            ctx.extend_from_slice(&0u16.to_le_bytes());
            ctx.extend_from_slice(&len.to_le_bytes());
            ctx.extend(vec![0u8; len as usize]);
        }
        w.write_hvm_context(&ctx).unwrap();
        w.write_hvm_params(&[(2, 7)]).unwrap();
        let img = w.finish(Some(&[9u8; 33]), None).unwrap();
        let p = tmpfile("ok.img", &img);
        let info = stream_info(&p).unwrap();
        assert_eq!(info.summary.guest_kind, "hvm");
        assert_eq!(info.summary.pages.with_data, 2);
        assert_eq!(info.summary.hvm_contexts[0].cpus, 1);
        assert_eq!(info.summary.emulator_contexts[0].len, 33);
        let text = render_text(&info);
        assert!(text.contains("2 with data"), "{text}");
        assert!(text.contains("1 CPU records"), "{text}");
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(json["guest_kind"], "hvm");
        assert_eq!(json["pages"]["pfn_max"], 0x101);

        let bad = tmpfile("bad.img", &img[..img.len() - 3]);
        let err = stream_info(&bad).unwrap_err();
        assert!(matches!(err, StreamInfoError::Malformed { .. }), "{err}");
        assert!(stream_info(Path::new("/nonexistent/kemari.img")).is_err());
        std::fs::remove_dir_all(p.parent().unwrap()).unwrap();
    }
}
