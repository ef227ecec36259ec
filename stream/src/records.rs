//! Kemari's record types in libxc's optional range (bit 31 set), with their names.
//!
//! Their own module because both [`crate::libxc`] (which names every record type in its
//! diagnostics) and [`crate::checkpoint`] (which encodes them) need them; the checkpoint module
//! re-exports them, so `checkpoint::REC_KEMARI_ACK` & co. are the same constants.

/// First type of Kemari's record range (optional bit set, 'K' in bits 15-8).
pub const KEMARI_REC_BASE: u32 = 0x8000_4B00;
/// Start of a checkpoint frame.
pub const REC_KEMARI_CHECKPOINT_BEGIN: u32 = KEMARI_REC_BASE + 0x01;
/// Device-model (QEMU) state of an HVM guest.
pub const REC_KEMARI_EMULATOR_STATE: u32 = KEMARI_REC_BASE + 0x02;
/// Extra per-checkpoint data (disk write log, ring state, ...), tagged with a kind.
pub const REC_KEMARI_EXTRA: u32 = KEMARI_REC_BASE + 0x03;
/// Trailer of a checkpoint frame (sequence, length, checksum).
pub const REC_KEMARI_CHECKPOINT_END: u32 = KEMARI_REC_BASE + 0x04;
/// Acknowledgement of a checkpoint (secondary -> primary).
pub const REC_KEMARI_ACK: u32 = KEMARI_REC_BASE + 0x10;
/// Refusal of a checkpoint (secondary -> primary).
pub const REC_KEMARI_NACK: u32 = KEMARI_REC_BASE + 0x11;

/// Name of a Kemari record type (for diagnostics).
pub fn kemari_record_name(rtype: u32) -> &'static str {
    match rtype {
        REC_KEMARI_CHECKPOINT_BEGIN => "KEMARI_CHECKPOINT_BEGIN",
        REC_KEMARI_EMULATOR_STATE => "KEMARI_EMULATOR_STATE",
        REC_KEMARI_EXTRA => "KEMARI_EXTRA",
        REC_KEMARI_CHECKPOINT_END => "KEMARI_CHECKPOINT_END",
        REC_KEMARI_ACK => "KEMARI_ACK",
        REC_KEMARI_NACK => "KEMARI_NACK",
        _ => "UNKNOWN_OPTIONAL",
    }
}
