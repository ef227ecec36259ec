//! Complete `xl save`-compatible images: [`ImageWriter`] writes one step by step,
//! [`ImageReader`] reads one (ours or a real `xl save` file) record by record with bounded
//! memory, [`summarize`] condenses one into an [`ImageSummary`].
//!
//! The layout, as Xen 4.17's `xl save` writes it and `xl restore` expects it:
//!
//! ```text
//! xl header + domain config JSON
//! libxl header "LibxlFmt" v2
//! libxl LIBXC_CONTEXT
//!   libxc image header, domain header (x86 HVM for HVM and PVH guests)
//!   X86_CPUID_POLICY, X86_MSR_POLICY (optional), STATIC_DATA_END
//!   PAGE_DATA * (<= 1024 pages each)
//!   X86_TSC_INFO, HVM_CONTEXT, HVM_PARAMS      (Xen's saver order; restore takes any order)
//!   END
//! libxl EMULATOR_XENSTORE_DATA ?                (HVM only)
//! libxl EMULATOR_CONTEXT                        (HVM only: QEMU's device state)
//! libxl END
//! ```

use std::collections::BTreeMap;
use std::io::{Read, Write};

use serde::Serialize;
use thiserror::Error;

use crate::frame::{self, FrameError};
use crate::libxc::{self, DomainHeader, DomainType, ImageHeader, LibxcError, Record, TscInfo};
use crate::libxl::{self, LibxlError, LibxlHeader, LibxlRecord};
use crate::xl::{XlError, XlHeader};
use crate::{Limits, MAX_PAGES_PER_RECORD, PAGE_SIZE};

/// Errors of the image writer and reader.
#[derive(Debug, Error)]
pub enum ImageError {
    /// xl header problem.
    #[error(transparent)]
    Xl(#[from] XlError),
    /// libxl layer problem.
    #[error(transparent)]
    Libxl(#[from] LibxlError),
    /// libxc layer problem.
    #[error(transparent)]
    Libxc(#[from] LibxcError),
    /// Framing or I/O problem.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Records in an order the writer refuses or `xl restore` would reject.
    #[error("image: {0}")]
    Order(String),
    /// Bytes after the libxl END record.
    #[error("image: data after the final libxl END record")]
    TrailingData,
}

/// What kind of guest an image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestKind {
    /// HVM guest with a QEMU device model (EMULATOR_CONTEXT required).
    Hvm,
    /// PVH guest (no device model).
    Pvh,
}

/// The fixed parts of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// HVM or PVH.
    pub kind: GuestKind,
    /// libxl domain configuration JSON (as `xl save` stores it; a NUL is appended).
    pub config_json: Vec<u8>,
    /// Xen version written in the domain header.
    pub xen_major: u32,
    /// Xen minor version.
    pub xen_minor: u32,
    /// `X86_CPUID_POLICY` body, if known.
    pub cpuid_policy: Option<Vec<u8>>,
    /// `X86_MSR_POLICY` body, if known.
    pub msr_policy: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum WState {
    Pages,
    Tsc,
    HvmContext,
    HvmParams,
}

/// Writes an `xl save`-compatible image step by step; each step checks that it comes in the
/// order `xl restore` expects.
pub struct ImageWriter<W: Write> {
    w: W,
    kind: GuestKind,
    limits: Limits,
    state: WState,
    pages: u64,
}

impl<W: Write> ImageWriter<W> {
    /// Writes the xl header, the libxl header, `LIBXC_CONTEXT`, the libxc image and domain
    /// headers and the static data (CPUID/MSR policies if given, `STATIC_DATA_END`).
    pub fn new(mut w: W, spec: &ImageSpec, limits: Limits) -> Result<Self, ImageError> {
        XlHeader::new(&spec.config_json).write(&mut w, &limits)?;
        LibxlHeader { options: 0 }.write(&mut w)?;
        LibxlRecord::LibxcContext.write(&mut w, &limits)?;
        ImageHeader::write(&mut w)?;
        DomainHeader::hvm(spec.xen_major, spec.xen_minor).write(&mut w)?;
        if let Some(p) = &spec.cpuid_policy {
            Record::X86CpuidPolicy(p.clone()).write(&mut w, &limits)?;
        }
        if let Some(p) = &spec.msr_policy {
            Record::X86MsrPolicy(p.clone()).write(&mut w, &limits)?;
        }
        Record::StaticDataEnd.write(&mut w, &limits)?;
        Ok(ImageWriter {
            w,
            kind: spec.kind,
            limits,
            state: WState::Pages,
            pages: 0,
        })
    }

    /// Pages written so far.
    pub fn pages_written(&self) -> u64 {
        self.pages
    }

    fn step(&mut self, next: WState, what: &str) -> Result<(), ImageError> {
        let ok = match next {
            WState::Pages => self.state == WState::Pages,
            WState::Tsc => self.state == WState::Pages,
            WState::HvmContext => self.state <= WState::Tsc,
            WState::HvmParams => self.state == WState::HvmContext,
        };
        if !ok {
            return Err(ImageError::Order(format!(
                "{what} cannot follow {:?} (order: pages, tsc info, HVM context, HVM params)",
                self.state
            )));
        }
        self.state = next;
        Ok(())
    }

    /// Writes normal pages as `PAGE_DATA` records of at most 1024 pages.
    pub fn write_pages(&mut self, pages: &[(u64, &[u8; PAGE_SIZE])]) -> Result<(), ImageError> {
        self.step(WState::Pages, "PAGE_DATA")?;
        for chunk in pages.chunks(MAX_PAGES_PER_RECORD as usize) {
            libxc::write_page_data(&mut self.w, chunk, &self.limits)?;
            self.pages += chunk.len() as u64;
        }
        Ok(())
    }

    /// Writes `X86_TSC_INFO` (optional; after the pages).
    pub fn write_tsc_info(&mut self, tsc: &TscInfo) -> Result<(), ImageError> {
        self.step(WState::Tsc, "X86_TSC_INFO")?;
        Record::TscInfo(*tsc).write(&mut self.w, &self.limits)?;
        Ok(())
    }

    /// Writes `HVM_CONTEXT` (the blob of `xc_domain_hvm_getcontext`).
    pub fn write_hvm_context(&mut self, ctx: &[u8]) -> Result<(), ImageError> {
        self.step(WState::HvmContext, "HVM_CONTEXT")?;
        frame::write_record(
            &mut self.w,
            libxc::REC_HVM_CONTEXT,
            &[ctx],
            self.limits.record_cap(),
            "HVM_CONTEXT",
        )?;
        Ok(())
    }

    /// Writes `HVM_PARAMS` (after `HVM_CONTEXT`, like Xen's saver).
    pub fn write_hvm_params(&mut self, params: &[(u64, u64)]) -> Result<(), ImageError> {
        self.step(WState::HvmParams, "HVM_PARAMS")?;
        Record::HvmParams(params.to_vec()).write(&mut self.w, &self.limits)?;
        Ok(())
    }

    /// Writes libxc `END`, then for HVM guests `EMULATOR_XENSTORE_DATA` (if given) and
    /// `EMULATOR_CONTEXT` (QEMU upstream, index 0), then libxl `END`. HVM guests need the
    /// emulator context; PVH guests must not have one. Returns the writer.
    pub fn finish(
        mut self,
        emulator_context: Option<&[u8]>,
        emulator_xenstore: Option<&[u8]>,
    ) -> Result<W, ImageError> {
        if self.state != WState::HvmParams {
            return Err(ImageError::Order(format!(
                "image finished after {:?}: HVM_CONTEXT and HVM_PARAMS are required",
                self.state
            )));
        }
        match (self.kind, emulator_context, emulator_xenstore) {
            (GuestKind::Hvm, None, _) => {
                return Err(ImageError::Order(
                    "an HVM image needs the device model's EMULATOR_CONTEXT".into(),
                ))
            }
            (GuestKind::Pvh, Some(_), _) | (GuestKind::Pvh, _, Some(_)) => {
                return Err(ImageError::Order(
                    "a PVH image has no device model: xl restore rejects emulator records".into(),
                ))
            }
            _ => {}
        }
        Record::End.write(&mut self.w, &self.limits)?;
        let cap = self.limits.record_cap();
        let hdr = |id: u32, index: u32| {
            let mut h = [0u8; 8];
            h[..4].copy_from_slice(&id.to_le_bytes());
            h[4..].copy_from_slice(&index.to_le_bytes());
            h
        };
        let emu = hdr(libxl::EMULATOR_QEMU_UPSTREAM, 0);
        if let Some(x) = emulator_xenstore {
            frame::write_record(
                &mut self.w,
                libxl::REC_EMULATOR_XENSTORE_DATA,
                &[&emu, x],
                cap,
                "EMULATOR_XENSTORE_DATA",
            )?;
        }
        if let Some(c) = emulator_context {
            frame::write_record(
                &mut self.w,
                libxl::REC_EMULATOR_CONTEXT,
                &[&emu, c],
                cap,
                "EMULATOR_CONTEXT",
            )?;
        }
        LibxlRecord::End.write(&mut self.w, &self.limits)?;
        self.w.flush().map_err(|source| FrameError::Io {
            what: "image",
            error: source,
        })?;
        Ok(self.w)
    }
}

/// One item of an image, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageItem {
    /// The libxc image and domain headers (after libxl `LIBXC_CONTEXT`).
    LibxcHeaders {
        /// Image header.
        image: ImageHeader,
        /// Domain header.
        domain: DomainHeader,
    },
    /// A libxc record (its `END` included).
    Libxc(Record),
    /// A libxl record other than `LIBXC_CONTEXT` (its final `END` included).
    Libxl(LibxlRecord),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RState {
    Libxl,
    LibxcHeaders,
    Libxc { version: u32, static_end: bool },
    Done,
}

/// Reads an image item by item. Memory is bounded by one record (at most the record cap).
pub struct ImageReader<R: Read> {
    r: R,
    limits: Limits,
    xl: XlHeader,
    libxl: LibxlHeader,
    state: RState,
    libxc_seen: bool,
}

impl<R: Read> ImageReader<R> {
    /// Reads and checks the xl and libxl headers.
    pub fn new(mut r: R, limits: Limits) -> Result<Self, ImageError> {
        let xl = XlHeader::read(&mut r, &limits)?;
        let libxl = LibxlHeader::read(&mut r)?;
        Ok(ImageReader {
            r,
            limits,
            xl,
            libxl,
            state: RState::Libxl,
            libxc_seen: false,
        })
    }

    /// The xl header.
    pub fn xl_header(&self) -> &XlHeader {
        &self.xl
    }

    /// The libxl header.
    pub fn libxl_header(&self) -> &LibxlHeader {
        &self.libxl
    }

    /// The next item, or `None` after the final libxl `END`.
    pub fn next_item(&mut self) -> Result<Option<ImageItem>, ImageError> {
        match self.state {
            RState::Done => Ok(None),
            RState::Libxl => {
                let rec = LibxlRecord::read(&mut self.r, &self.limits)?;
                match rec {
                    LibxlRecord::LibxcContext => {
                        if self.libxc_seen {
                            return Err(ImageError::Order(
                                "second LIBXC_CONTEXT in a non-checkpointed image".into(),
                            ));
                        }
                        self.libxc_seen = true;
                        self.state = RState::LibxcHeaders;
                        self.next_item()
                    }
                    LibxlRecord::End => {
                        if !self.libxc_seen {
                            return Err(ImageError::Order(
                                "libxl END before any LIBXC_CONTEXT".into(),
                            ));
                        }
                        self.state = RState::Done;
                        Ok(Some(ImageItem::Libxl(LibxlRecord::End)))
                    }
                    other => Ok(Some(ImageItem::Libxl(other))),
                }
            }
            RState::LibxcHeaders => {
                let image = ImageHeader::read(&mut self.r)?;
                let domain = DomainHeader::read(&mut self.r)?;
                self.state = RState::Libxc {
                    version: image.version,
                    static_end: image.version < 3,
                };
                Ok(Some(ImageItem::LibxcHeaders { image, domain }))
            }
            RState::Libxc {
                version,
                static_end,
            } => {
                let rec = Record::read(&mut self.r, &self.limits)?;
                match &rec {
                    Record::StaticDataEnd => {
                        if static_end {
                            return Err(ImageError::Order(
                                "STATIC_DATA_END twice (or in a v2 stream)".into(),
                            ));
                        }
                        self.state = RState::Libxc {
                            version,
                            static_end: true,
                        };
                    }
                    Record::PageData(_) if !static_end => {
                        return Err(ImageError::Order("PAGE_DATA before STATIC_DATA_END".into()));
                    }
                    Record::End => self.state = RState::Libxl,
                    _ => {}
                }
                Ok(Some(ImageItem::Libxc(rec)))
            }
        }
    }

    /// The underlying reader, positioned right after the last item read (on a Kemari
    /// connection, checkpoint frames follow the final `END`).
    pub fn into_inner(self) -> R {
        self.r
    }

    /// After the final `END`: fails if any byte follows. Returns the reader.
    pub fn finish(mut self) -> Result<R, ImageError> {
        if self.state != RState::Done {
            return Err(ImageError::Order(
                "image reader finished before the final libxl END".into(),
            ));
        }
        let mut b = [0u8; 1];
        if frame::read_up_to(&mut self.r, &mut b, "image tail")? != 0 {
            return Err(ImageError::TrailingData);
        }
        Ok(self.r)
    }
}

/// Count and bytes of one record type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RecordStat {
    /// Occurrences.
    pub count: u64,
    /// Body bytes in total.
    pub bytes: u64,
}

/// Page statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PageStats {
    /// `PAGE_DATA` records.
    pub records: u64,
    /// pfn entries.
    pub entries: u64,
    /// Entries with page contents.
    pub with_data: u64,
    /// Entries per page type name.
    pub by_type: BTreeMap<String, u64>,
    /// Lowest pfn.
    pub pfn_min: Option<u64>,
    /// Highest pfn.
    pub pfn_max: Option<u64>,
    /// Lowest pfn with contents.
    pub data_pfn_min: Option<u64>,
    /// Highest pfn with contents.
    pub data_pfn_max: Option<u64>,
    /// Most entries in one record.
    pub max_per_record: u64,
}

/// One HVM context record's summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HvmContextSummary {
    /// Blob length.
    pub len: u64,
    /// Records per HVM save type name.
    pub records: BTreeMap<String, u64>,
    /// `CPU` records (one per vCPU).
    pub cpus: u64,
    /// Set if the blob could not be walked.
    pub parse_error: Option<String>,
}

/// An emulator record's summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EmulatorBlob {
    /// `EMULATOR_*` id.
    pub id: u32,
    /// Index.
    pub index: u32,
    /// Blob length.
    pub len: u64,
}

/// What an image contains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageSummary {
    /// xl mandatory flags.
    pub xl_mandatory_flags: u32,
    /// xl optional flags.
    pub xl_optional_flags: u32,
    /// Config length in bytes (as stored).
    pub config_len: u64,
    /// Whether the config is JSON.
    pub config_is_json: bool,
    /// Guest type from the config (`hvm`, `pvh`, `pv`), if found.
    pub config_guest_type: Option<String>,
    /// Domain name from the config, if found.
    pub config_name: Option<String>,
    /// libxl header options.
    pub libxl_options: u32,
    /// libxc stream version.
    pub libxc_version: u32,
    /// libxc domain header.
    pub domain: DomainHeader,
    /// Guest kind: from the config if present, else from the libxc type and emulator records.
    pub guest_kind: String,
    /// Records per layer and name (`libxl.END`, `libxc.PAGE_DATA`, ...).
    pub records: BTreeMap<String, RecordStat>,
    /// Pages.
    pub pages: PageStats,
    /// TSC info.
    pub tsc_info: Option<TscInfo>,
    /// HVM context records.
    pub hvm_contexts: Vec<HvmContextSummary>,
    /// HVM params `(index, value)`.
    pub hvm_params: Vec<(u64, u64)>,
    /// Emulator contexts.
    pub emulator_contexts: Vec<EmulatorBlob>,
    /// Emulator xenstore data records.
    pub emulator_xenstore: Vec<EmulatorBlob>,
    /// Total bytes read.
    pub total_bytes: u64,
}

fn config_fields(xl: &XlHeader) -> (Option<String>, Option<String>) {
    if !xl.config_is_json() {
        return (None, None);
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(xl.config_text()) else {
        return (None, None);
    };
    let c_info = &v["c_info"];
    let mut ty = c_info["type"].as_str().map(str::to_owned);
    if ty.is_none() {
        // Older configs: the build info's keyed union is named by the type.
        if let Some(obj) = v["b_info"].as_object() {
            for key in ["type.hvm", "type.pvh", "type.pv"] {
                if obj.contains_key(key) {
                    ty = key.strip_prefix("type.").map(str::to_owned);
                }
            }
        }
    }
    (ty, c_info["name"].as_str().map(str::to_owned))
}

struct CountingReader<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

/// Reads a whole image and summarizes it; every page with contents is passed to `on_page`
/// as it is read (nothing is kept). Fails on malformed input, a missing final `END`, or bytes
/// after it.
pub fn summarize<R: Read>(
    r: R,
    limits: Limits,
    on_page: &mut dyn FnMut(u64, &[u8]),
) -> Result<ImageSummary, ImageError> {
    let mut rd = ImageReader::new(CountingReader { inner: r, n: 0 }, limits)?;
    let xl = rd.xl_header().clone();
    let (config_guest_type, config_name) = config_fields(&xl);
    let libxl_options = rd.libxl_header().options;
    let mut records: BTreeMap<String, RecordStat> = BTreeMap::new();
    let mut count = |layer: &str, name: &str, bytes: u64| {
        let s = records.entry(format!("{layer}.{name}")).or_default();
        s.count += 1;
        s.bytes += bytes;
    };
    let mut headers = None;
    let mut pages = PageStats::default();
    let mut tsc_info = None;
    let mut hvm_contexts = Vec::new();
    let mut hvm_params = Vec::new();
    let mut emulator_contexts = Vec::new();
    let mut emulator_xenstore = Vec::new();
    while let Some(item) = rd.next_item()? {
        match item {
            ImageItem::LibxcHeaders { image, domain } => headers = Some((image, domain)),
            ImageItem::Libxl(rec) => {
                let name = libxl::record_name(rec.rtype());
                match &rec {
                    LibxlRecord::EmulatorContext { id, index, blob } => {
                        count("libxl", name, 8 + blob.len() as u64);
                        emulator_contexts.push(EmulatorBlob {
                            id: *id,
                            index: *index,
                            len: blob.len() as u64,
                        });
                    }
                    LibxlRecord::EmulatorXenstoreData { id, index, data } => {
                        count("libxl", name, 8 + data.len() as u64);
                        emulator_xenstore.push(EmulatorBlob {
                            id: *id,
                            index: *index,
                            len: data.len() as u64,
                        });
                    }
                    LibxlRecord::CheckpointState { .. } => count("libxl", name, 4),
                    _ => count("libxl", name, 0),
                }
            }
            ImageItem::Libxc(rec) => {
                let name = libxc::record_name(rec.rtype());
                match &rec {
                    Record::PageData(pd) => {
                        count(
                            "libxc",
                            name,
                            (8 + 8 * pd.entries.len() + pd.data.len()) as u64,
                        );
                        pages.records += 1;
                        pages.entries += pd.entries.len() as u64;
                        pages.max_per_record = pages.max_per_record.max(pd.entries.len() as u64);
                        for (pfn, t, data) in pd.pages() {
                            *pages.by_type.entry(t.name().to_owned()).or_default() += 1;
                            pages.pfn_min = Some(pages.pfn_min.map_or(pfn, |m| m.min(pfn)));
                            pages.pfn_max = Some(pages.pfn_max.map_or(pfn, |m| m.max(pfn)));
                            if let Some(d) = data {
                                pages.with_data += 1;
                                pages.data_pfn_min =
                                    Some(pages.data_pfn_min.map_or(pfn, |m| m.min(pfn)));
                                pages.data_pfn_max =
                                    Some(pages.data_pfn_max.map_or(pfn, |m| m.max(pfn)));
                                on_page(pfn, d);
                            }
                        }
                    }
                    Record::HvmContext(blob) => {
                        count("libxc", name, blob.len() as u64);
                        let mut s = HvmContextSummary {
                            len: blob.len() as u64,
                            records: BTreeMap::new(),
                            cpus: 0,
                            parse_error: None,
                        };
                        match libxc::hvm_context_records(blob) {
                            Ok(recs) => {
                                for r in recs {
                                    *s.records
                                        .entry(libxc::hvm_save::name(r.typecode).to_owned())
                                        .or_default() += 1;
                                    if r.typecode == libxc::hvm_save::CPU {
                                        s.cpus += 1;
                                    }
                                }
                            }
                            Err(e) => s.parse_error = Some(e.to_string()),
                        }
                        hvm_contexts.push(s);
                    }
                    Record::HvmParams(p) => {
                        count("libxc", name, 8 + 16 * p.len() as u64);
                        hvm_params.extend_from_slice(p);
                    }
                    Record::TscInfo(t) => {
                        count("libxc", name, libxc::TSC_INFO_LEN as u64);
                        tsc_info = Some(*t);
                    }
                    Record::X86CpuidPolicy(b) | Record::X86MsrPolicy(b) => {
                        count("libxc", name, b.len() as u64)
                    }
                    Record::Opaque { body, .. } => count("libxc", name, body.len() as u64),
                    Record::CheckpointDirtyPfnList(p) => count("libxc", name, 8 * p.len() as u64),
                    Record::SkippedOptional { length, .. } => {
                        count("libxc", name, u64::from(*length))
                    }
                    Record::End | Record::StaticDataEnd | Record::Checkpoint | Record::Verify => {
                        count("libxc", name, 0)
                    }
                }
            }
        }
    }
    let counting = rd.finish()?;
    let Some((image, domain)) = headers else {
        return Err(ImageError::Order("no libxc stream in the image".into()));
    };
    let guest_kind = match (&config_guest_type, domain.domain_type) {
        (Some(t), _) => t.clone(),
        (None, DomainType::X86Pv) => "pv".into(),
        (None, DomainType::X86Hvm) if !emulator_contexts.is_empty() => "hvm".into(),
        (None, DomainType::X86Hvm) => "hvm-or-pvh".into(),
    };
    Ok(ImageSummary {
        xl_mandatory_flags: xl.mandatory_flags,
        xl_optional_flags: xl.optional_flags,
        config_len: xl.config.len() as u64,
        config_is_json: xl.config_is_json(),
        config_guest_type,
        config_name,
        libxl_options,
        libxc_version: image.version,
        domain,
        guest_kind,
        records,
        pages,
        tsc_info,
        hvm_contexts,
        hvm_params,
        emulator_contexts,
        emulator_xenstore,
        total_bytes: counting.n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn hvm_blob(cpus: u16) -> Vec<u8> {
        let mut blob = Vec::new();
        let mut push = |t: u16, i: u16, len: usize| {
            blob.extend_from_slice(&t.to_le_bytes());
            blob.extend_from_slice(&i.to_le_bytes());
            blob.extend_from_slice(&(len as u32).to_le_bytes());
            blob.extend(vec![0xAB; len]);
        };
        push(1, 0, 24);
        for c in 0..cpus {
            push(2, c, 1024);
        }
        push(0, 0, 0);
        blob
    }

    fn spec(kind: GuestKind) -> ImageSpec {
        let ty = match kind {
            GuestKind::Hvm => "hvm",
            GuestKind::Pvh => "pvh",
        };
        ImageSpec {
            kind,
            config_json: format!(r#"{{"c_info":{{"type":"{ty}","name":"g1"}}}}"#).into_bytes(),
            xen_major: 4,
            xen_minor: 17,
            cpuid_policy: Some(vec![1; 48]),
            msr_policy: Some(vec![2; 16]),
        }
    }

    fn write_image(kind: GuestKind, npages: u64) -> Vec<u8> {
        let page = [7u8; PAGE_SIZE];
        let mut w = ImageWriter::new(Vec::new(), &spec(kind), Limits::default()).unwrap();
        let pages: Vec<(u64, &[u8; PAGE_SIZE])> = (0..npages).map(|p| (p, &page)).collect();
        w.write_pages(&pages).unwrap();
        w.write_tsc_info(&TscInfo {
            mode: 0,
            khz: 2_000_000,
            nsec: 5,
            incarnation: 0,
        })
        .unwrap();
        w.write_hvm_context(&hvm_blob(2)).unwrap();
        w.write_hvm_params(&[(2, 0xfeff_f000), (1, 3)]).unwrap();
        match kind {
            GuestKind::Hvm => w.finish(Some(b"QEVM state"), Some(b"x\0y\0")).unwrap(),
            GuestKind::Pvh => w.finish(None, None).unwrap(),
        }
    }

    #[test]
    fn hvm_image_summary() {
        let img = write_image(GuestKind::Hvm, 2500);
        let mut seen = 0u64;
        let s = summarize(&img[..], Limits::default(), &mut |pfn, d| {
            assert_eq!(d.len(), PAGE_SIZE);
            assert_eq!(pfn, seen);
            seen += 1;
        })
        .unwrap();
        assert_eq!(seen, 2500);
        assert_eq!(s.guest_kind, "hvm");
        assert_eq!(s.config_name.as_deref(), Some("g1"));
        assert_eq!(s.domain, DomainHeader::hvm(4, 17));
        assert_eq!(s.pages.with_data, 2500);
        assert_eq!(s.pages.records, 3);
        assert_eq!(s.pages.max_per_record, 1024);
        assert_eq!((s.pages.pfn_min, s.pages.pfn_max), (Some(0), Some(2499)));
        assert_eq!(
            (s.pages.data_pfn_min, s.pages.data_pfn_max),
            (Some(0), Some(2499))
        );
        assert_eq!(s.hvm_contexts.len(), 1);
        assert_eq!(s.hvm_contexts[0].cpus, 2);
        assert_eq!(s.hvm_params, vec![(2, 0xfeff_f000), (1, 3)]);
        assert_eq!(
            s.emulator_contexts,
            vec![EmulatorBlob {
                id: libxl::EMULATOR_QEMU_UPSTREAM,
                index: 0,
                len: 10
            }]
        );
        assert_eq!(s.emulator_xenstore.len(), 1);
        assert_eq!(s.records["libxc.STATIC_DATA_END"].count, 1);
        assert_eq!(s.records["libxc.X86_CPUID_POLICY"].bytes, 48);
        assert_eq!(s.records["libxl.END"].count, 1);
        assert_eq!(s.total_bytes, img.len() as u64);
    }

    #[test]
    fn pvh_image_has_no_emulator() {
        let img = write_image(GuestKind::Pvh, 3);
        let s = summarize(&img[..], Limits::default(), &mut |_, _| {}).unwrap();
        assert_eq!(s.guest_kind, "pvh");
        assert!(s.emulator_contexts.is_empty());
        assert_eq!(s.pages.with_data, 3);
    }

    #[test]
    fn item_order_matches_xen_saver() {
        let img = write_image(GuestKind::Hvm, 1);
        let mut rd = ImageReader::new(&img[..], Limits::default()).unwrap();
        let mut names = Vec::new();
        while let Some(item) = rd.next_item().unwrap() {
            names.push(match item {
                ImageItem::LibxcHeaders { .. } => "headers".to_string(),
                ImageItem::Libxc(r) => format!("libxc.{}", libxc::record_name(r.rtype())),
                ImageItem::Libxl(r) => format!("libxl.{}", libxl::record_name(r.rtype())),
            });
        }
        rd.finish().unwrap();
        assert_eq!(
            names,
            [
                "headers",
                "libxc.X86_CPUID_POLICY",
                "libxc.X86_MSR_POLICY",
                "libxc.STATIC_DATA_END",
                "libxc.PAGE_DATA",
                "libxc.X86_TSC_INFO",
                "libxc.HVM_CONTEXT",
                "libxc.HVM_PARAMS",
                "libxc.END",
                "libxl.EMULATOR_XENSTORE_DATA",
                "libxl.EMULATOR_CONTEXT",
                "libxl.END"
            ]
        );
    }

    #[test]
    fn checkpoint_frames_follow_the_image() {
        let mut stream = write_image(GuestKind::Pvh, 1);
        let cp = crate::checkpoint::Checkpoint {
            seq: 1,
            reason: crate::checkpoint::EpochReason::Initial,
            pages: vec![],
            hvm_context: vec![1],
            hvm_params: vec![],
            emulator_state: None,
            extra: vec![],
        };
        crate::checkpoint::write_checkpoint(&mut stream, &cp, &Limits::default()).unwrap();
        let mut rd = ImageReader::new(&stream[..], Limits::default()).unwrap();
        while rd.next_item().unwrap().is_some() {}
        let mut rest = rd.into_inner();
        let back = crate::checkpoint::CheckpointReader::new(Limits::default())
            .read(&mut rest, 1)
            .unwrap();
        assert_eq!(back, cp);
        assert!(rest.is_empty());
    }

    #[test]
    fn writer_refuses_wrong_order() {
        let page = [0u8; PAGE_SIZE];
        let mut w = ImageWriter::new(Vec::new(), &spec(GuestKind::Hvm), Limits::default()).unwrap();
        assert!(w.write_hvm_params(&[]).is_err());
        w.write_hvm_context(&[]).unwrap();
        assert!(w.write_pages(&[(1, &page)]).is_err());
        assert!(w.write_tsc_info(&TscInfo::default()).is_err());
        w.write_hvm_params(&[]).unwrap();
        let w2 = ImageWriter::new(Vec::new(), &spec(GuestKind::Hvm), Limits::default()).unwrap();
        assert!(w2.finish(Some(b"x"), None).is_err(), "no HVM context");
        assert!(w.finish(None, None).is_err(), "HVM without emulator");
        let mut p = ImageWriter::new(Vec::new(), &spec(GuestKind::Pvh), Limits::default()).unwrap();
        p.write_hvm_context(&[]).unwrap();
        p.write_hvm_params(&[]).unwrap();
        assert!(p.finish(Some(b"x"), None).is_err(), "PVH with emulator");
    }

    #[test]
    fn params_before_context_accepted_by_reader() {
        // Build by hand: the spec's order (HVM_PARAMS first).
        let lim = Limits::default();
        let mut img = Vec::new();
        XlHeader::new(b"{}").write(&mut img, &lim).unwrap();
        LibxlHeader { options: 0 }.write(&mut img).unwrap();
        LibxlRecord::LibxcContext.write(&mut img, &lim).unwrap();
        ImageHeader::write(&mut img).unwrap();
        DomainHeader::hvm(4, 17).write(&mut img).unwrap();
        Record::StaticDataEnd.write(&mut img, &lim).unwrap();
        Record::HvmParams(vec![(1, 1)])
            .write(&mut img, &lim)
            .unwrap();
        Record::HvmContext(hvm_blob(1))
            .write(&mut img, &lim)
            .unwrap();
        Record::End.write(&mut img, &lim).unwrap();
        LibxlRecord::End.write(&mut img, &lim).unwrap();
        let s = summarize(&img[..], lim, &mut |_, _| {}).unwrap();
        assert_eq!(s.hvm_contexts[0].cpus, 1);
        assert_eq!(s.hvm_params, vec![(1, 1)]);
        assert_eq!(s.guest_kind, "hvm-or-pvh");
    }

    #[test]
    fn truncated_at_every_offset_rejected() {
        let img = write_image(GuestKind::Hvm, 2);
        for cut in 0..img.len() {
            assert!(
                summarize(&img[..cut], Limits::default(), &mut |_, _| {}).is_err(),
                "cut at {cut} accepted"
            );
        }
        let mut longer = img.clone();
        longer.push(0);
        assert!(matches!(
            summarize(&longer[..], Limits::default(), &mut |_, _| {}),
            Err(ImageError::TrailingData)
        ));
    }

    #[test]
    fn hostile_images_rejected() {
        let lim = Limits::default();
        let base = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut img = Vec::new();
            XlHeader::new(b"{}").write(&mut img, &lim).unwrap();
            LibxlHeader { options: 0 }.write(&mut img).unwrap();
            LibxlRecord::LibxcContext.write(&mut img, &lim).unwrap();
            ImageHeader::write(&mut img).unwrap();
            DomainHeader::hvm(4, 17).write(&mut img).unwrap();
            f(&mut img);
            Record::End.write(&mut img, &lim).unwrap();
            LibxlRecord::End.write(&mut img, &lim).unwrap();
            summarize(&img[..], lim, &mut |_, _| {})
        };
        let page = [0u8; PAGE_SIZE];
        // Pages before STATIC_DATA_END.
        assert!(matches!(
            base(&|img| {
                libxc::write_page_data(img, &[(1, &page)], &lim).unwrap();
            }),
            Err(ImageError::Order(_))
        ));
        // Mandatory unknown record.
        assert!(matches!(
            base(&|img| {
                Record::StaticDataEnd.write(img, &lim).unwrap();
                frame::write_record(img, 0x42, &[b"zz"], 100, "t").unwrap();
            }),
            Err(ImageError::Libxc(LibxcError::UnknownMandatory {
                rtype: 0x42,
                ..
            }))
        ));
        // Optional unknown record is skipped.
        assert!(base(&|img| {
            Record::StaticDataEnd.write(img, &lim).unwrap();
            frame::write_record(img, 0x8000_0042, &[b"zz"], 100, "t").unwrap();
        })
        .is_ok());
        // Huge record length.
        assert!(base(&|img| {
            Record::StaticDataEnd.write(img, &lim).unwrap();
            img.extend_from_slice(&frame::header_bytes(libxc::REC_HVM_CONTEXT, u32::MAX));
        })
        .is_err());
    }
}
