//! Regression tests against real bytes: the first 64 KiB of images written by stock `xl save`
//! of a PVH and an HVM guest on Xen 4.17 in the lab (`scripts/lab test compat`, step
//! "compat/decode"). They hold the xl header with the libxl config JSON, the libxl header,
//! `LIBXC_CONTEXT`, the libxc headers, the CPUID/MSR policies, `STATIC_DATA_END` and the start
//! of the first 1024-entry `PAGE_DATA` record, which the cut truncates.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use kemari_stream::frame::FrameError;
use kemari_stream::image::{ImageError, ImageItem, ImageReader};
use kemari_stream::libxc::{DomainHeader, DomainType, LibxcError, Record};
use kemari_stream::xl::{FLAG_JSON, FLAG_STREAM_V2};
use kemari_stream::Limits;

fn check(bytes: &[u8], guest_type: &str) {
    let mut rd = ImageReader::new(bytes, Limits::default()).unwrap();
    let xl = rd.xl_header().clone();
    assert_eq!(xl.mandatory_flags, FLAG_JSON | FLAG_STREAM_V2);
    assert_eq!(xl.optional_flags, 0);
    assert_eq!(
        xl.config.last(),
        Some(&0),
        "xl stores the JSON with its NUL"
    );
    let cfg: serde_json::Value = serde_json::from_slice(xl.config_text()).unwrap();
    assert_eq!(cfg["c_info"]["type"], guest_type);
    assert_eq!(rd.libxl_header().options, 0);

    match rd.next_item().unwrap() {
        Some(ImageItem::LibxcHeaders { image, domain }) => {
            assert_eq!(image.version, 3);
            // PVH guests are saved as x86 HVM: the libxc stream has no PVH type.
            assert_eq!(domain, DomainHeader::hvm(4, 17));
            assert_eq!(domain.domain_type, DomainType::X86Hvm);
        }
        other => panic!("expected the libxc headers, got {other:?}"),
    }
    let mut names = Vec::new();
    let err = loop {
        match rd.next_item() {
            Ok(Some(ImageItem::Libxc(r))) => names.push(match r {
                Record::X86CpuidPolicy(p) => format!("CPUID({})", p.len()),
                Record::X86MsrPolicy(p) => format!("MSR({})", p.len()),
                Record::StaticDataEnd => "STATIC_DATA_END".into(),
                other => format!("{other:?}"),
            }),
            Ok(other) => panic!("unexpected item {other:?}"),
            Err(e) => break e,
        }
    };
    assert_eq!(names, ["CPUID(1224)", "MSR(32)", "STATIC_DATA_END"]);
    // The cut falls inside the first PAGE_DATA record: a clean truncation error.
    match err {
        ImageError::Libxc(LibxcError::Frame(FrameError::Truncated { what, got, wanted })) => {
            assert_eq!(what, "PAGE_DATA");
            assert!(got < wanted && wanted > 4_000_000, "{got} of {wanted}");
        }
        other => panic!("expected a truncated PAGE_DATA, got {other}"),
    }
}

#[test]
fn real_pvh_xl_save_head() {
    check(include_bytes!("data/xl-save-pvh-head.bin"), "pvh");
}

#[test]
fn real_hvm_xl_save_head() {
    check(include_bytes!("data/xl-save-hvm-head.bin"), "hvm");
}
