//! The initial image on the wire: an `xl save` image, written in pieces by the sender while
//! the guest runs, and read back (validated record by record) by the receiver.
//!
//! Layout (what `xl save` writes for an HVM/PVH guest, see `docs/stream.md`):
//!
//! ```text
//! xl header + config JSON
//! libxl header, LIBXC_CONTEXT
//!   libxc image header, domain header (X86_HVM), STATIC_DATA_END,
//!   PAGE_DATA * (live rounds, then the paused round), HVM_CONTEXT, HVM_PARAMS, END
//! [EMULATOR_XENSTORE_DATA] [EMULATOR_CONTEXT]   (HVM guests with QEMU)
//! libxl END
//! ```
//!
//! Unpopulated pfns are not sent at all (libxc sends them as `XTAB` entries without data; the
//! restorer populates only the pfns it is given data for, so leaving them out is equivalent).
//! `X86_TSC_INFO` and the CPUID/MSR policy records are left out: without them `xl restore`
//! keeps the config's TSC mode and CPU policy, as for a stream from Xen < 4.14.

use std::io::{Read, Write};

use hypervisor::{hvm_save, PAGE_SIZE};
use kemari_stream::frame::FrameError;
use kemari_stream::libxc::{
    self, DomainHeader, DomainType, ImageHeader, LibxcError, PageType, Record,
};
use kemari_stream::libxl::{self, LibxlError, LibxlHeader, LibxlRecord, EMULATOR_QEMU_UPSTREAM};
use kemari_stream::xl::{XlError, XlHeader};
use kemari_stream::Limits;

/// Xen version written in the domain header.
pub const XEN_MAJOR: u32 = 4;
/// Xen minor version written in the domain header.
pub const XEN_MINOR: u32 = 17;

/// Errors of writing or reading an initial image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// xl header.
    #[error("initial image: {0}")]
    Xl(#[from] XlError),
    /// libxl layer.
    #[error("initial image: {0}")]
    Libxl(#[from] LibxlError),
    /// libxc layer.
    #[error("initial image: {0}")]
    Libxc(#[from] LibxcError),
    /// Framing / I/O.
    #[error("initial image: {0}")]
    Frame(#[from] FrameError),
    /// Well-formed records in an order or combination this image must not have.
    #[error("initial image: {0}")]
    Invalid(String),
    /// The page callback refused a page.
    #[error("initial image: page {pfn:#x}: {detail}")]
    Page {
        /// The pfn.
        pfn: u64,
        /// Why.
        detail: String,
    },
}

/// Writes everything before the first `PAGE_DATA`.
pub fn write_prologue<W: Write + ?Sized>(
    w: &mut W,
    config_json: &[u8],
    limits: &Limits,
) -> Result<(), ImageError> {
    XlHeader::new(config_json).write(w, limits)?;
    LibxlHeader { options: 0 }.write(w)?;
    LibxlRecord::LibxcContext.write(w, limits)?;
    ImageHeader::write(w)?;
    DomainHeader::hvm(XEN_MAJOR, XEN_MINOR).write(w)?;
    Record::StaticDataEnd.write(w, limits)?;
    Ok(())
}

/// Writes pages as `PAGE_DATA` records of at most 1024 pages.
pub fn write_pages<W: Write + ?Sized>(
    w: &mut W,
    pages: &[(u64, &[u8; PAGE_SIZE])],
    limits: &Limits,
) -> Result<(), ImageError> {
    for chunk in pages.chunks(kemari_stream::MAX_PAGES_PER_RECORD as usize) {
        libxc::write_page_data(w, chunk, limits)?;
    }
    Ok(())
}

/// The device model's part of an image (HVM guests with QEMU).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EmulatorImage {
    /// `EMULATOR_XENSTORE_DATA` (the device model's xenstore keys), if any.
    pub xenstore_data: Option<Vec<u8>>,
    /// `EMULATOR_CONTEXT`: QEMU's saved device state.
    pub context: Vec<u8>,
}

/// Writes everything after the last `PAGE_DATA`.
pub fn write_epilogue<W: Write + ?Sized>(
    w: &mut W,
    hvm_context: &[u8],
    hvm_params: &[(u32, u64)],
    emulator: Option<&EmulatorImage>,
    limits: &Limits,
) -> Result<(), ImageError> {
    Record::HvmContext(hvm_context.to_vec()).write(w, limits)?;
    let params: Vec<(u64, u64)> = hvm_params
        .iter()
        .map(|(i, v)| (u64::from(*i), *v))
        .collect();
    if !params.is_empty() {
        Record::HvmParams(params).write(w, limits)?;
    }
    Record::End.write(w, limits)?;
    if let Some(emu) = emulator {
        if let Some(xs) = &emu.xenstore_data {
            LibxlRecord::EmulatorXenstoreData {
                id: EMULATOR_QEMU_UPSTREAM,
                index: 0,
                data: xs.clone(),
            }
            .write(w, limits)?;
        }
        LibxlRecord::EmulatorContext {
            id: EMULATOR_QEMU_UPSTREAM,
            index: 0,
            blob: emu.context.clone(),
        }
        .write(w, limits)?;
    }
    LibxlRecord::End.write(w, limits)?;
    Ok(())
}

/// Receives `(pfn, contents)` of every page with data; an `Err` stops the read.
pub type PageSink<'a> = dyn FnMut(u64, &[u8]) -> Result<(), String> + 'a;

/// What an image holds besides its pages.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageSummary {
    /// The domain configuration (JSON text, without xl's trailing NUL).
    pub config: Vec<u8>,
    /// Pages with data.
    pub pages: u64,
    /// Highest pfn with data.
    pub max_pfn: Option<u64>,
    /// Entries without data (`XTAB` & co.).
    pub holes: u64,
    /// The HVM context.
    pub hvm_context: Vec<u8>,
    /// HVM parameters.
    pub hvm_params: Vec<(u32, u64)>,
    /// The device model's part, if any.
    pub emulator: Option<EmulatorImage>,
}

/// Reads a whole image from `r`, checking every record, and calls `on_page(pfn, contents)` for
/// every page with data (a pfn sent again in a later round replaces the earlier contents).
/// Stops right after libxl's `END` (bytes after it are left unread).
pub fn read_image<R: Read + ?Sized>(
    r: &mut R,
    limits: &Limits,
    on_page: &mut PageSink<'_>,
) -> Result<ImageSummary, ImageError> {
    let xl = XlHeader::read(r, limits)?;
    if !xl.config_is_json() {
        return Err(ImageError::Invalid(
            "the xl header carries no JSON config".into(),
        ));
    }
    let mut summary = ImageSummary {
        config: xl.config_text().to_vec(),
        ..ImageSummary::default()
    };
    LibxlHeader::read(r)?;
    let mut libxc_done = false;
    let mut emulator: Option<EmulatorImage> = None;
    let mut pending_xs: Option<Vec<u8>> = None;
    loop {
        match LibxlRecord::read(r, limits)? {
            LibxlRecord::LibxcContext => {
                if libxc_done {
                    return Err(ImageError::Invalid("a second LIBXC_CONTEXT".into()));
                }
                read_libxc(r, limits, &mut summary, on_page)?;
                libxc_done = true;
            }
            LibxlRecord::EmulatorXenstoreData { data, .. } => pending_xs = Some(data),
            LibxlRecord::EmulatorContext { blob, .. } => {
                if emulator.is_some() {
                    return Err(ImageError::Invalid("a second EMULATOR_CONTEXT".into()));
                }
                emulator = Some(EmulatorImage {
                    xenstore_data: pending_xs.take(),
                    context: blob,
                });
            }
            LibxlRecord::End => break,
            other => {
                return Err(ImageError::Invalid(format!(
                    "libxl record {} in an initial image",
                    libxl::record_name(other.rtype())
                )))
            }
        }
    }
    if !libxc_done {
        return Err(ImageError::Invalid("no LIBXC_CONTEXT before END".into()));
    }
    summary.emulator = emulator;
    Ok(summary)
}

fn read_libxc<R: Read + ?Sized>(
    r: &mut R,
    limits: &Limits,
    summary: &mut ImageSummary,
    on_page: &mut PageSink<'_>,
) -> Result<(), ImageError> {
    let ih = ImageHeader::read(r)?;
    if ih.version != libxc::IHDR_VERSION {
        return Err(ImageError::Invalid(format!(
            "libxc stream version {}, expected 3",
            ih.version
        )));
    }
    let dh = DomainHeader::read(r)?;
    if dh.domain_type != DomainType::X86Hvm {
        return Err(ImageError::Invalid(format!(
            "domain type {:?}: only HVM/PVH guests are protected",
            dh.domain_type
        )));
    }
    let mut static_end = false;
    let mut context = None;
    loop {
        match Record::read(r, limits)? {
            Record::StaticDataEnd => {
                if static_end {
                    return Err(ImageError::Invalid("a second STATIC_DATA_END".into()));
                }
                static_end = true;
            }
            Record::PageData(pd) => {
                if !static_end {
                    return Err(ImageError::Invalid(
                        "PAGE_DATA before STATIC_DATA_END".into(),
                    ));
                }
                if context.is_some() {
                    return Err(ImageError::Invalid("PAGE_DATA after HVM_CONTEXT".into()));
                }
                for (pfn, ptype, data) in pd.pages() {
                    match data {
                        Some(d) if ptype == PageType::NOTAB => {
                            on_page(pfn, d).map_err(|detail| ImageError::Page { pfn, detail })?;
                            summary.pages += 1;
                            summary.max_pfn = Some(summary.max_pfn.map_or(pfn, |m| m.max(pfn)));
                        }
                        Some(_) => {
                            return Err(ImageError::Invalid(format!(
                                "pfn {pfn:#x} has page type {}, not a normal page",
                                ptype.name()
                            )))
                        }
                        None => summary.holes += 1,
                    }
                }
            }
            Record::HvmContext(ctx) => {
                if context.is_some() {
                    return Err(ImageError::Invalid("a second HVM_CONTEXT".into()));
                }
                hvm_save::parse(&ctx).map_err(|e| ImageError::Invalid(e.to_string()))?;
                context = Some(ctx);
            }
            Record::HvmParams(params) => {
                for (i, v) in params {
                    let i = u32::try_from(i).map_err(|_| {
                        ImageError::Invalid(format!("HVM param index {i:#x} out of range"))
                    })?;
                    summary.hvm_params.push((i, v));
                }
            }
            Record::TscInfo(_)
            | Record::X86CpuidPolicy(_)
            | Record::X86MsrPolicy(_)
            | Record::SkippedOptional { .. } => {}
            Record::End => break,
            other => {
                return Err(ImageError::Invalid(format!(
                    "libxc record {} in an initial image",
                    libxc::record_name(other.rtype())
                )))
            }
        }
    }
    summary.hvm_context =
        context.ok_or_else(|| ImageError::Invalid("no HVM_CONTEXT before the libxc END".into()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::hvm_save::HvmContextBuilder;

    fn ctx() -> Vec<u8> {
        let mut b = HvmContextBuilder::new();
        b.push(hvm_save::HVM_SAVE_CPU, 0, &[7u8; 64]).unwrap();
        b.finish()
    }

    fn image(emulator: bool) -> Vec<u8> {
        let limits = Limits::default();
        let mut out = Vec::new();
        write_prologue(&mut out, br#"{"c_info":{"name":"g"}}"#, &limits).unwrap();
        let a = [1u8; PAGE_SIZE];
        let b = [2u8; PAGE_SIZE];
        write_pages(&mut out, &[(0, &a), (5, &a)], &limits).unwrap();
        write_pages(&mut out, &[(5, &b)], &limits).unwrap();
        let emu = EmulatorImage {
            xenstore_data: Some(b"physmap\0".to_vec()),
            context: vec![9; 100],
        };
        write_epilogue(
            &mut out,
            &ctx(),
            &[(1, 0xfeffc), (17, 3)],
            emulator.then_some(&emu),
            &limits,
        )
        .unwrap();
        out
    }

    #[test]
    fn round_trip_with_later_rounds_overriding() {
        let img = image(true);
        let mut seen = Vec::new();
        let mut rest = &img[..];
        let s = read_image(&mut rest, &Limits::default(), &mut |pfn, d| {
            seen.push((pfn, d[0]));
            Ok(())
        })
        .unwrap();
        assert!(rest.is_empty());
        assert_eq!(seen, vec![(0, 1), (5, 1), (5, 2)]);
        assert_eq!(s.pages, 3);
        assert_eq!(s.max_pfn, Some(5));
        assert_eq!(s.hvm_context, ctx());
        assert_eq!(s.hvm_params, vec![(1, 0xfeffc), (17, 3)]);
        assert_eq!(s.config, br#"{"c_info":{"name":"g"}}"#.to_vec());
        let emu = s.emulator.unwrap();
        assert_eq!(emu.context, vec![9; 100]);
        assert_eq!(emu.xenstore_data.as_deref(), Some(&b"physmap\0"[..]));
        let s = read_image(&mut &image(false)[..], &Limits::default(), &mut |_, _| {
            Ok(())
        })
        .unwrap();
        assert!(s.emulator.is_none());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let img = image(true);
        for cut in (0..img.len()).step_by(97) {
            let r = read_image(&mut &img[..cut], &Limits::default(), &mut |_, _| Ok(()));
            assert!(r.is_err(), "truncated at {cut} accepted");
        }
    }

    #[test]
    fn missing_context_and_refused_pages_are_errors() {
        let limits = Limits::default();
        let mut out = Vec::new();
        write_prologue(&mut out, b"{}", &limits).unwrap();
        Record::End.write(&mut out, &limits).unwrap();
        LibxlRecord::End.write(&mut out, &limits).unwrap();
        let e = read_image(&mut &out[..], &limits, &mut |_, _| Ok(())).unwrap_err();
        assert!(e.to_string().contains("no HVM_CONTEXT"), "{e}");
        let img = image(false);
        let e = read_image(&mut &img[..], &limits, &mut |_, _| Err("full".into())).unwrap_err();
        assert!(matches!(e, ImageError::Page { pfn: 0, .. }), "{e}");
    }
}
