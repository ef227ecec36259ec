//! Transparent failover on stock Xen 4.17: the paused replica of a guest that was checkpointed
//! by *pausing* it (never suspended) gets back the PV state Xen keeps outside guest memory, and
//! runs on from the checkpoint without noticing (`docs/failover.md`, section 9).
//!
//! dom0 can rebuild part of that state for another domain itself (the `shared_info` mapping,
//! the callback parameter, guest memory). The rest only the guest's own context can create:
//! binding VIRQs and IPIs, FIFO `init_control`/`expand_array`, `register_vcpu_info`, the
//! per-vCPU upcall vector. So a small **stub** runs in the replica's vCPU 0 before the guest
//! does: nine guest pages (saved and put back after) hold its code, a table of hypercalls and
//! their arguments, and page tables identity-mapping the low 4 GiB; a CPU record in 64-bit
//! mode with interrupts off points at it. The stub makes each call of the table in order
//! (`VMCALL`/`VMMCALL`), stores each result, sets a done flag and spins on `pause` (never
//! `hlt`: a halted vCPU with interrupts off is taken down by Xen). Ports come out with the
//! guest's own numbers because Xen hands out the lowest free port: the table walks the
//! guest's ports in ascending order and fills gaps with placeholders it closes afterwards.
//!
//! Then dom0 pauses the replica, puts the stub's pages and the `vcpu_info` bytes back (Xen's
//! `register_vcpu_info` overwrites them), marks every bound port pending (the guest's handlers
//! then look at their rings and its timer handler re-arms the timer, which Xen lost with the
//! old domain), loads the checkpoint's full HVM context with the upcall vector raised in each
//! LAPIC, and unpauses.
//!
//! [`plan`] (the table) and the context edits are pure and tested here; [`resurrect`] is
//! proven in the lab (`scripts/lab test transparent`).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use hypervisor::{hvm_save, DomId, Hypervisor, HypervisorError, Pfn, Port, DOMID_SELF, PAGE_SIZE};
use serde::Serialize;

use super::pvstate::{
    canonical_event_array, read_ports, PortEntry, PortKind, PvState, PvStateError, FIFO_MASKED,
    HVM_PARAM_CALLBACK_IRQ, HVM_PARAM_CONSOLE_PFN, HVM_PARAM_STORE_PFN, VIRQ_TIMER, WORDS_PER_PAGE,
};
use crate::sync::receiver::Staged;

/// `__HYPERVISOR_vcpu_op`.
pub const HYPERCALL_VCPU_OP: u64 = 24;
/// `__HYPERVISOR_event_channel_op`.
pub const HYPERCALL_EVENT_CHANNEL_OP: u64 = 32;
/// `__HYPERVISOR_hvm_op`.
pub const HYPERCALL_HVM_OP: u64 = 34;
const EVTCHNOP_BIND_VIRQ: u64 = 1;
const EVTCHNOP_CLOSE: u64 = 3;
const EVTCHNOP_ALLOC_UNBOUND: u64 = 6;
const EVTCHNOP_BIND_IPI: u64 = 7;
const EVTCHNOP_BIND_VCPU: u64 = 8;
const EVTCHNOP_UNMASK: u64 = 9;
const EVTCHNOP_INIT_CONTROL: u64 = 11;
const EVTCHNOP_EXPAND_ARRAY: u64 = 12;
const EVTCHNOP_SET_PRIORITY: u64 = 13;
const VCPUOP_REGISTER_VCPU_INFO: u64 = 10;
const HVMOP_SET_EVTCHN_UPCALL_VECTOR: u64 = 23;
/// `XENMAPSPACE_shared_info`.
pub const XENMAPSPACE_SHARED_INFO: u32 = 0;
/// Linux's `HYPERVISOR_CALLBACK_VECTOR`.
pub const UPCALL_VECTOR: u8 = 0xf3;
/// `HVM_SAVE_CODE(LAPIC_REGS)`.
pub const HVM_SAVE_LAPIC_REGS: u16 = 6;
/// Pages the stub uses: code, table, arguments, PML4, PDPT, 4 page directories.
pub const STUB_PAGES: usize = 9;
/// Bytes of one table entry: `nr, a1, a2, a3, result`.
pub const ENTRY_LEN: usize = 40;
/// Bytes of one argument slot.
pub const ARG_LEN: usize = 32;
/// What an entry's result slot holds until the stub has made its call: no hypercall returns it
/// (they return 0, a small positive value or a negated errno), so dom0 can tell the calls made
/// from those not made when the stub stops early.
pub const NOT_RUN: u64 = 0x4e4f_5452_554e_0000;
/// Table entries that fit the table page (the last one is the terminator).
pub const MAX_OPS: usize = PAGE_SIZE / ENTRY_LEN - 1;
/// Where the stub's pages are looked for (low RAM, below 4 GiB).
pub const STUB_SEARCH_FROM: Pfn = 0x100;

// hvm_hw_cpu field offsets (xen/include/public/arch-x86/hvm/save.h, Xen 4.17).
const CPU_RBX: usize = 520;
const CPU_RIP: usize = 640;
const CPU_RFLAGS: usize = 648;
const CPU_CR3: usize = 672;
const CPU_CR4: usize = 680;
const CPU_EFER: usize = 992;
const CPU_PENDING_EVENT: usize = 1016;
const CPU_LEN: usize = 1032;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;

/// The stub: `rbx` = table. Per entry: `rax=[rbx]`, end if `-1`; `rdi,rsi,rdx = [rbx+8..]`;
/// hypercall; `[rbx+32]=rax`; `rbx+=40`. At the end `[rbx+8]=1`, then `pause; jmp` forever.
/// Assembled with GNU as (intel syntax) from exactly that; bytes 0x15..0x18 are the hypercall
/// instruction, patched per vendor.
const STUB_CODE: [u8; 46] = [
    0x48, 0x8b, 0x03, // mov rax, [rbx]
    0x48, 0x83, 0xf8, 0xff, // cmp rax, -1
    0x74, 0x19, // je done
    0x48, 0x8b, 0x7b, 0x08, // mov rdi, [rbx+8]
    0x48, 0x8b, 0x73, 0x10, // mov rsi, [rbx+16]
    0x48, 0x8b, 0x53, 0x18, // mov rdx, [rbx+24]
    0x0f, 0x01, 0xd9, // vmmcall (or vmcall 0f 01 c1)
    0x48, 0x89, 0x43, 0x20, // mov [rbx+32], rax
    0x48, 0x83, 0xc3, 0x28, // add rbx, 40
    0xeb, 0xde, // jmp loop
    0x48, 0xc7, 0x43, 0x08, 0x01, 0x00, 0x00, 0x00, // done: mov qword [rbx+8], 1
    0xf3, 0x90, // spin: pause
    0xeb, 0xfc, // jmp spin
];
const STUB_INSN_AT: usize = 0x15;

/// The hypercall instruction of the host's CPU vendor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum HypercallInsn {
    /// Intel VMX: `vmcall`.
    Vmcall,
    /// AMD SVM: `vmmcall`.
    Vmmcall,
}

impl HypercallInsn {
    /// From `/proc/cpuinfo`'s `vendor_id`.
    pub fn from_cpuinfo(cpuinfo: &str) -> Option<HypercallInsn> {
        let vendor = cpuinfo
            .lines()
            .find(|l| l.starts_with("vendor_id"))?
            .split(':')
            .nth(1)?
            .trim();
        match vendor {
            "GenuineIntel" => Some(HypercallInsn::Vmcall),
            "AuthenticAMD" | "HygonGenuine" => Some(HypercallInsn::Vmmcall),
            _ => None,
        }
    }

    fn bytes(self) -> [u8; 3] {
        match self {
            HypercallInsn::Vmcall => [0x0f, 0x01, 0xc1],
            HypercallInsn::Vmmcall => [0x0f, 0x01, 0xd9],
        }
    }
}

/// Errors of the transparent failover.
#[derive(Debug, thiserror::Error)]
pub enum TransparentError {
    /// A call to Xen about the replica failed.
    #[error("replica domain {domid}: {step}: {source}")]
    Xen {
        /// The replica.
        domid: DomId,
        /// Which step.
        step: &'static str,
        /// The failed call.
        #[source]
        source: HypervisorError,
    },
    /// The guest's PV state cannot be rebuilt this way.
    #[error("replica domain {domid}: cannot rebuild its PV state: {why}")]
    Unsupported {
        /// The replica.
        domid: DomId,
        /// Why.
        why: String,
    },
    /// Reading the replica's ports failed.
    #[error(transparent)]
    Ports(#[from] PvStateError),
    /// The staged HVM context is malformed.
    #[error("staged HVM context: {0}")]
    Context(#[from] hvm_save::HvmSaveError),
    /// The stub did not finish.
    #[error("replica domain {domid}: the stub did not finish within {waited_ms} ms ({done} of {total} calls made; domain: {state})")]
    StubTimeout {
        /// The replica.
        domid: DomId,
        /// How long dom0 waited.
        waited_ms: u64,
        /// Calls that returned.
        done: usize,
        /// Calls in the table.
        total: usize,
        /// The domain's state then.
        state: String,
    },
    /// A call of the stub failed or gave another port than the guest's.
    #[error("replica domain {domid}: stub call {index} ({what}) {problem}")]
    StubCall {
        /// The replica.
        domid: DomId,
        /// Its index in the table.
        index: usize,
        /// What it was.
        what: String,
        /// What went wrong.
        problem: String,
    },
}

/// One hypercall of the stub's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// For messages: what it does.
    pub what: String,
    /// Hypercall number.
    pub nr: u64,
    /// First argument (the sub-command).
    pub a1: u64,
    /// Second argument: a vCPU, or [`ArgRef::Arg`].
    pub a2: ArgRef,
    /// Third argument.
    pub a3: ArgRef,
    /// The argument structure (at most [`ARG_LEN`] bytes).
    pub arg: Vec<u8>,
    /// The port the call must give back, and where in `arg` Xen writes it.
    pub expect_port: Option<(usize, Port)>,
}

/// A hypercall argument: a number, or the address of the op's argument structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgRef {
    /// Unused (0).
    None,
    /// A plain value.
    Value(u64),
    /// The guest address of this op's argument structure.
    Arg,
}

fn le(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn evtchn_op(what: String, cmd: u64, arg: Vec<u8>, expect_port: Option<(usize, Port)>) -> Op {
    Op {
        what,
        nr: HYPERCALL_EVENT_CHANNEL_OP,
        a1: cmd,
        a2: ArgRef::Arg,
        a3: ArgRef::None,
        arg,
        expect_port,
    }
}

fn close(port: Port, why: &str) -> Op {
    evtchn_op(
        format!("close port {port} ({why})"),
        EVTCHNOP_CLOSE,
        port.to_le_bytes().to_vec(),
        None,
    )
}

fn same_binding(a: &PortKind, b: &PortKind) -> bool {
    match (a, b) {
        // the remote port is the other host's backend's: only the domain must match
        (
            PortKind::Interdomain { remote_dom: x, .. },
            PortKind::Interdomain { remote_dom: y, .. },
        ) => x == y,
        (PortKind::Unbound { remote_dom: x }, PortKind::Unbound { remote_dom: y }) => x == y,
        _ => false,
    }
}

/// What the replica keeps: ports the toolstack made for it on this host (xenstore, console)
/// that the guest had with the same binding.
pub fn kept_ports(guest: &[PortEntry], replica: &[PortEntry]) -> Vec<Port> {
    replica
        .iter()
        .filter(|r| {
            guest
                .iter()
                .any(|g| g.port == r.port && same_binding(&g.kind, &r.kind))
        })
        .map(|r| r.port)
        .collect()
}

/// Whether a guest whose `HVM_PARAM_CALLBACK_IRQ` is `callback_irq` takes its event upcalls
/// through per-vCPU vectors (`HVMOP_set_evtchn_upcall_vector`, self-only) rather than the
/// parameter (which dom0 sets). Linux with per-vCPU vectors sets the parameter to 1 (GSI 1)
/// "to trick the toolstack into thinking it is enlightened" (`xen_set_upcall_vector`); the lab
/// showed exactly that value on a PVH guest. 0 (no callback set) means the same.
pub fn uses_percpu_vector(callback_irq: u64) -> bool {
    callback_irq <= 1
}

/// The stub's table for `pv` on a replica whose bound ports are `replica`; `masked` are the
/// guest's masked ports (not unmasked at the end).
pub fn plan(
    domid: DomId,
    pv: &PvState,
    replica: &[PortEntry],
    masked: &HashSet<Port>,
) -> Result<Vec<Op>, TransparentError> {
    let unsupported = |why: String| TransparentError::Unsupported { domid, why };
    if pv.fifo_control.is_empty() {
        return Err(unsupported(
            "2-level event channels (only FIFO guests are handled so far)".into(),
        ));
    }
    let kept: HashSet<Port> = kept_ports(&pv.ports, replica).into_iter().collect();
    let mut ops = Vec::new();
    // 1. the replica's ports the guest does not have (or has bound otherwise)
    for r in replica.iter().filter(|r| !kept.contains(&r.port)) {
        ops.push(close(r.port, "not the guest's"));
    }
    // 2. FIFO
    for (v, cb) in pv.fifo_control.iter().enumerate() {
        ops.push(evtchn_op(
            format!("init_control vcpu {v} at {:#x}+{:#x}", cb.gfn, cb.offset),
            EVTCHNOP_INIT_CONTROL,
            le(&[
                &cb.gfn.to_le_bytes(),
                &cb.offset.to_le_bytes(),
                &(v as u32).to_le_bytes(),
                &[0u8; 8],
            ]),
            None,
        ));
    }
    for gfn in &pv.fifo_array {
        ops.push(evtchn_op(
            format!("expand_array {gfn:#x}"),
            EVTCHNOP_EXPAND_ARRAY,
            gfn.to_le_bytes().to_vec(),
            None,
        ));
    }
    // 3. every port in ascending order: the lowest free one comes out each time
    let max = pv.ports.last().map(|p| p.port).unwrap_or(0);
    let mut placeholders = Vec::new();
    for port in 1..=max {
        if kept.contains(&port) {
            continue;
        }
        let Some(e) = pv.ports.iter().find(|p| p.port == port) else {
            placeholders.push(port);
            ops.push(evtchn_op(
                format!("placeholder port {port}"),
                EVTCHNOP_ALLOC_UNBOUND,
                le(&[&DOMID_SELF.to_le_bytes(), &0u16.to_le_bytes(), &[0u8; 4]]),
                Some((4, port)),
            ));
            continue;
        };
        let op = match e.kind {
            PortKind::Virq { virq } => evtchn_op(
                format!("bind_virq {virq} vcpu {} -> port {port}", e.vcpu),
                EVTCHNOP_BIND_VIRQ,
                le(&[&virq.to_le_bytes(), &e.vcpu.to_le_bytes(), &[0u8; 4]]),
                Some((8, port)),
            ),
            PortKind::Ipi => evtchn_op(
                format!("bind_ipi vcpu {} -> port {port}", e.vcpu),
                EVTCHNOP_BIND_IPI,
                le(&[&e.vcpu.to_le_bytes(), &[0u8; 4]]),
                Some((4, port)),
            ),
            PortKind::Interdomain { remote_dom, .. } | PortKind::Unbound { remote_dom } => {
                evtchn_op(
                    format!("alloc_unbound for domain {remote_dom} -> port {port}"),
                    EVTCHNOP_ALLOC_UNBOUND,
                    le(&[
                        &DOMID_SELF.to_le_bytes(),
                        &remote_dom.to_le_bytes(),
                        &[0u8; 4],
                    ]),
                    Some((4, port)),
                )
            }
            PortKind::Pirq { pirq } => {
                return Err(unsupported(format!(
                    "port {port} is bound to physical IRQ {pirq}"
                )))
            }
        };
        ops.push(op);
    }
    for p in placeholders {
        ops.push(close(p, "placeholder"));
    }
    // 4. Linux gives its timer the highest priority; everything else keeps the default
    for e in &pv.ports {
        if e.kind == (PortKind::Virq { virq: VIRQ_TIMER }) {
            ops.push(evtchn_op(
                format!("set_priority port {} 0", e.port),
                EVTCHNOP_SET_PRIORITY,
                le(&[&e.port.to_le_bytes(), &0u32.to_le_bytes()]),
                None,
            ));
        }
    }
    // 5. notify vCPUs of the ports allocated unbound
    for e in &pv.ports {
        let unbound_kind = matches!(
            e.kind,
            PortKind::Interdomain { .. } | PortKind::Unbound { .. }
        );
        if unbound_kind && e.vcpu != 0 {
            ops.push(evtchn_op(
                format!("bind_vcpu port {} vcpu {}", e.port, e.vcpu),
                EVTCHNOP_BIND_VCPU,
                le(&[&e.port.to_le_bytes(), &e.vcpu.to_le_bytes()]),
                None,
            ));
        }
    }
    // 6. per-vCPU registrations
    for (v, vi) in pv.vcpu_info.iter().enumerate() {
        ops.push(Op {
            what: format!(
                "register_vcpu_info vcpu {v} at {:#x}+{:#x}",
                vi.gfn, vi.offset
            ),
            nr: HYPERCALL_VCPU_OP,
            a1: VCPUOP_REGISTER_VCPU_INFO,
            a2: ArgRef::Value(v as u64),
            a3: ArgRef::Arg,
            arg: le(&[&vi.gfn.to_le_bytes(), &vi.offset.to_le_bytes(), &[0u8; 4]]),
            expect_port: None,
        });
    }
    if uses_percpu_vector(pv.callback_irq) {
        for v in 0..pv.vcpus {
            ops.push(Op {
                what: format!("set_evtchn_upcall_vector vcpu {v} {UPCALL_VECTOR:#x}"),
                nr: HYPERCALL_HVM_OP,
                a1: HVMOP_SET_EVTCHN_UPCALL_VECTOR,
                a2: ArgRef::Arg,
                a3: ArgRef::None,
                arg: le(&[&v.to_le_bytes(), &[UPCALL_VECTOR, 0, 0, 0]]),
                expect_port: None,
            });
        }
    }
    // 7. relink every pending, unmasked port (dom0 marked them all pending)
    for e in pv.ports.iter().filter(|e| !masked.contains(&e.port)) {
        ops.push(evtchn_op(
            format!("unmask port {}", e.port),
            EVTCHNOP_UNMASK,
            e.port.to_le_bytes().to_vec(),
            None,
        ));
    }
    if ops.len() > MAX_OPS {
        return Err(unsupported(format!(
            "{} stub calls, the table holds {MAX_OPS}",
            ops.len()
        )));
    }
    Ok(ops)
}

/// The contents of the stub's [`STUB_PAGES`] pages at `gfns` for `ops`.
pub fn stub_pages(
    gfns: &[Pfn; STUB_PAGES],
    ops: &[Op],
    insn: HypercallInsn,
) -> Vec<[u8; PAGE_SIZE]> {
    let addr = |i: usize| gfns[i] << 12;
    let mut pages = vec![[0u8; PAGE_SIZE]; STUB_PAGES];
    pages[0][..STUB_CODE.len()].copy_from_slice(&STUB_CODE);
    pages[0][STUB_INSN_AT..STUB_INSN_AT + 3].copy_from_slice(&insn.bytes());
    let val = |a: ArgRef, i: usize| match a {
        ArgRef::None => 0,
        ArgRef::Value(v) => v,
        ArgRef::Arg => addr(2) + (i * ARG_LEN) as u64,
    };
    for (i, op) in ops.iter().enumerate() {
        let e = &mut pages[1][i * ENTRY_LEN..(i + 1) * ENTRY_LEN];
        e[0..8].copy_from_slice(&op.nr.to_le_bytes());
        e[8..16].copy_from_slice(&op.a1.to_le_bytes());
        e[16..24].copy_from_slice(&val(op.a2, i).to_le_bytes());
        e[24..32].copy_from_slice(&val(op.a3, i).to_le_bytes());
        e[32..40].copy_from_slice(&NOT_RUN.to_le_bytes());
        let a = &mut pages[2][i * ARG_LEN..i * ARG_LEN + op.arg.len().min(ARG_LEN)];
        a.copy_from_slice(&op.arg[..op.arg.len().min(ARG_LEN)]);
    }
    let t = ops.len() * ENTRY_LEN;
    pages[1][t..t + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    // identity map of 0..4 GiB: PML4[0] -> PDPT, PDPT[i] -> PD i, 2 MiB pages
    pages[3][0..8].copy_from_slice(&(addr(4) | 0x3).to_le_bytes());
    for i in 0..4 {
        pages[4][i * 8..i * 8 + 8].copy_from_slice(&(addr(5 + i) | 0x3).to_le_bytes());
        for j in 0..512 {
            let pde = (((i * 512 + j) as u64) << 21) | 0x83;
            pages[5 + i][j * 8..j * 8 + 8].copy_from_slice(&pde.to_le_bytes());
        }
    }
    pages
}

/// How many of the table's calls the stub made, from the entries' result slots: it makes them in
/// order, and a made call's slot no longer holds [`NOT_RUN`] (a call returning 0 counts).
pub fn calls_made(results: &[u64]) -> usize {
    results.iter().take_while(|r| **r != NOT_RUN).count()
}

fn get_u64(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

fn set_u64(b: &mut [u8], off: usize, v: u64) {
    if let Some(s) = b.get_mut(off..off + 8) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

/// The context that runs the stub: the staged context's header and vCPU 0's CPU record, with
/// `rip` at the code, `rbx` at the table, `cr3` at the PML4, interrupts off and no pending
/// event injection.
pub fn stub_context(
    domid: DomId,
    staged: &[u8],
    gfns: &[Pfn; STUB_PAGES],
) -> Result<Vec<u8>, TransparentError> {
    let records = hvm_save::parse(staged)?;
    let unsupported = |why: String| TransparentError::Unsupported { domid, why };
    let header = records
        .iter()
        .find(|r| r.typecode == hvm_save::HVM_SAVE_HEADER)
        .ok_or_else(|| unsupported("the staged context has no header".into()))?;
    let cpu = records
        .iter()
        .find(|r| r.typecode == hvm_save::HVM_SAVE_CPU && r.instance == 0)
        .ok_or_else(|| unsupported("the staged context has no CPU record for vCPU 0".into()))?;
    if cpu.body.len() != CPU_LEN {
        return Err(unsupported(format!(
            "CPU record of {} bytes (Xen 4.17's is {CPU_LEN})",
            cpu.body.len()
        )));
    }
    let mut body = cpu.body.to_vec();
    if get_u64(&body, CPU_EFER) & EFER_LMA == 0 {
        return Err(unsupported(
            "vCPU 0 was not in long mode at the checkpoint".into(),
        ));
    }
    if get_u64(&body, CPU_CR4) & CR4_LA57 != 0 {
        return Err(unsupported("5-level paging (CR4.LA57)".into()));
    }
    set_u64(&mut body, CPU_RIP, gfns[0] << 12);
    set_u64(&mut body, CPU_RBX, gfns[1] << 12);
    set_u64(&mut body, CPU_RFLAGS, 0x2);
    set_u64(&mut body, CPU_CR3, gfns[3] << 12);
    set_u64(&mut body, CPU_PENDING_EVENT, 0);
    let mut b = hvm_save::HvmContextBuilder::new();
    b.push(header.typecode, header.instance, header.body)?;
    b.push(cpu.typecode, cpu.instance, &body)?;
    Ok(b.finish())
}

/// The staged context with `vector` raised in every vCPU's LAPIC IRR.
pub fn context_with_upcall(staged: &[u8], vector: u8) -> Result<Vec<u8>, TransparentError> {
    let mut b = hvm_save::HvmContextBuilder::new();
    let irr = 0x200 + 0x10 * usize::from(vector / 32);
    let bit = 1u32 << (vector % 32);
    for r in hvm_save::parse(staged)? {
        if r.typecode == HVM_SAVE_LAPIC_REGS && r.body.len() >= irr + 4 {
            let mut body = r.body.to_vec();
            let v = u32::from_le_bytes([body[irr], body[irr + 1], body[irr + 2], body[irr + 3]]);
            body[irr..irr + 4].copy_from_slice(&(v | bit).to_le_bytes());
            b.push(r.typecode, r.instance, &body)?;
        } else {
            b.push(r.typecode, r.instance, r.body)?;
        }
    }
    Ok(b.finish())
}

/// Adds Xen's `shared_info` frame of a domain to its physmap (dom0 may do it for any domain).
pub trait SharedInfoMap {
    /// `XENMEM_add_to_physmap(domid, XENMAPSPACE_shared_info, 0, gfn)`.
    fn map_shared_info(&self, domid: DomId, gfn: Pfn) -> hypervisor::Result<()>;
}

impl SharedInfoMap for hypervisor::xen::XenHost {
    fn map_shared_info(&self, domid: DomId, gfn: Pfn) -> hypervisor::Result<()> {
        self.add_to_physmap(domid, XENMAPSPACE_SHARED_INFO, 0, gfn)
    }
}

/// What [`resurrect`] did.
#[derive(Debug, Clone, Serialize)]
pub struct ResurrectReport {
    /// The replica, now the guest.
    pub domid: DomId,
    /// The checkpoint it runs from.
    pub seq: u64,
    /// Ports the replica kept (the toolstack's xenstore/console ports on this host).
    pub kept_ports: Vec<Port>,
    /// Stub calls made.
    pub stub_calls: usize,
    /// Where the stub ran.
    pub stub_gfns: Vec<Pfn>,
    /// Ports the replica has afterwards (must be the guest's).
    pub ports_after: Vec<PortEntry>,
    /// The stub's run (unpause to done).
    pub stub_ms: f64,
    /// All of it, up to the final unpause.
    pub total_ms: f64,
}

/// Rebuilds `pv` in the paused `replica` (memory at checkpoint `staged.seq`), loads the staged
/// context and, unless `keep_paused`, unpauses it. On an error before the final context load
/// the replica stays paused, its stub pages put back where that was reached.
pub fn resurrect(
    hv: &dyn Hypervisor,
    shinfo: &dyn SharedInfoMap,
    replica: DomId,
    staged: &Staged,
    pv: &PvState,
    insn: HypercallInsn,
    keep_paused: bool,
) -> Result<ResurrectReport, TransparentError> {
    let t0 = Instant::now();
    let xen = |step, source| TransparentError::Xen {
        domid: replica,
        step,
        source,
    };
    let unsupported = |why: String| TransparentError::Unsupported {
        domid: replica,
        why,
    };
    let info = hv.domain_info(replica).map_err(|e| xen("domain info", e))?;
    if !info.paused {
        return Err(unsupported("the replica is not paused".into()));
    }
    if info.max_vcpu_id + 1 != pv.vcpus {
        return Err(unsupported(format!(
            "the replica has {} vCPUs, the guest {}",
            info.max_vcpu_id + 1,
            pv.vcpus
        )));
    }
    if pv.vcpus != 1 {
        return Err(unsupported(format!(
            "{} vCPUs (the stub needs the other vCPUs down; only 1 is handled so far)",
            pv.vcpus
        )));
    }
    let replica_ports = read_ports(hv, replica)?;
    let kept = kept_ports(&pv.ports, &replica_ports);

    // Pages the stub must not use.
    let mut avoid: HashSet<Pfn> = pv.xen_written_frames().into_iter().collect();
    avoid.insert(pv.shared_info_gfn);
    for p in [HVM_PARAM_STORE_PFN, HVM_PARAM_CONSOLE_PFN] {
        avoid.insert(hv.hvm_param(replica, p).map_err(|e| xen("ring pfn", e))?);
    }
    let mut gfns = [0 as Pfn; STUB_PAGES];
    let mut saved = Vec::with_capacity(STUB_PAGES);
    let mut pfn = STUB_SEARCH_FROM;
    let mut page = [0u8; PAGE_SIZE];
    while saved.len() < STUB_PAGES {
        if pfn >= 1 << 20 {
            return Err(unsupported(
                "no 9 RAM pages below 4 GiB for the stub".into(),
            ));
        }
        if !avoid.contains(&pfn) && hv.read_page(replica, pfn, &mut page).is_ok() {
            gfns[saved.len()] = pfn;
            saved.push(page);
        }
        pfn += 1;
    }
    // vcpu_info bytes, which register_vcpu_info overwrites
    let mut vcpu_info_pages = Vec::new();
    for vi in &pv.vcpu_info {
        hv.read_page(replica, vi.gfn, &mut page)
            .map_err(|e| xen("reading a vcpu_info page", e))?;
        vcpu_info_pages.push((vi.gfn, vi.offset as usize, page));
    }
    // FIFO: canonical event words, every bound port pending; empty control blocks
    let bound: Vec<Port> = pv.ports.iter().map(|p| p.port).collect();
    let mut masked = HashSet::new();
    for (k, gfn) in pv.fifo_array.iter().enumerate() {
        hv.read_page(replica, *gfn, &mut page)
            .map_err(|e| xen("reading an event array page", e))?;
        let first = (k * WORDS_PER_PAGE) as Port;
        let canon = canonical_event_array(&page, first, &bound);
        for p in &bound {
            if let Some(i) = p.checked_sub(first).map(|i| i as usize * 4) {
                if let Some(w) = canon.get(i..i + 4) {
                    if u32::from_le_bytes([w[0], w[1], w[2], w[3]]) & FIFO_MASKED != 0 {
                        masked.insert(*p);
                    }
                }
            }
        }
        page.copy_from_slice(&canon);
        hv.write_page(replica, *gfn, &page)
            .map_err(|e| xen("writing an event array page", e))?;
    }
    for cb in &pv.fifo_control {
        hv.read_page(replica, cb.gfn, &mut page)
            .map_err(|e| xen("reading a control block", e))?;
        let o = cb.offset as usize;
        if let Some(s) = page.get_mut(o..o + 72) {
            s.fill(0);
        }
        hv.write_page(replica, cb.gfn, &page)
            .map_err(|e| xen("writing a control block", e))?;
    }
    shinfo
        .map_shared_info(replica, pv.shared_info_gfn)
        .map_err(|e| xen("mapping shared_info", e))?;
    if !uses_percpu_vector(pv.callback_irq) {
        hv.set_hvm_param(replica, HVM_PARAM_CALLBACK_IRQ, pv.callback_irq)
            .map_err(|e| xen("HVM_PARAM_CALLBACK_IRQ", e))?;
    }

    let ops = plan(replica, pv, &replica_ports, &masked)?;
    let stub = stub_pages(&gfns, &ops, insn);
    let put_back = |hv: &dyn Hypervisor| -> Result<(), TransparentError> {
        for (gfn, p) in gfns.iter().zip(&saved) {
            hv.write_page(replica, *gfn, p)
                .map_err(|e| xen("putting back the stub's pages", e))?;
        }
        Ok(())
    };
    for (gfn, p) in gfns.iter().zip(&stub) {
        hv.write_page(replica, *gfn, p)
            .map_err(|e| xen("writing the stub", e))?;
    }
    let ctx = stub_context(replica, &staged.hvm_context, &gfns)?;
    hv.set_hvm_context(replica, &ctx)
        .map_err(|e| xen("loading the stub's context", e))?;

    let ts = Instant::now();
    hv.unpause(replica)
        .map_err(|e| xen("running the stub", e))?;
    let done_at = ops.len() * ENTRY_LEN + 8;
    let deadline = Duration::from_secs(20);
    let finished = loop {
        hv.read_page(replica, gfns[1], &mut page)
            .map_err(|e| xen("reading the stub's table", e))?;
        if get_u64(&page, done_at) == 1 {
            break true;
        }
        let info = hv.domain_info(replica).map_err(|e| xen("domain info", e))?;
        if info.shutdown.is_some() || ts.elapsed() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stub_ms = ts.elapsed().as_secs_f64() * 1000.0;
    hv.pause(replica)
        .map_err(|e| xen("pausing after the stub", e))?;
    hv.read_page(replica, gfns[1], &mut page)
        .map_err(|e| xen("reading the stub's table", e))?;
    let results: Vec<u64> = (0..ops.len())
        .map(|i| get_u64(&page, i * ENTRY_LEN + 32))
        .collect();
    let mut args = [0u8; PAGE_SIZE];
    hv.read_page(replica, gfns[2], &mut args)
        .map_err(|e| xen("reading the stub's arguments", e))?;
    put_back(hv)?;
    if !finished {
        let info = hv.domain_info(replica).map_err(|e| xen("domain info", e))?;
        let done = calls_made(&results);
        return Err(TransparentError::StubTimeout {
            domid: replica,
            waited_ms: stub_ms as u64,
            done,
            total: ops.len(),
            state: format!("{:?}", info.shutdown).replace("None", "running"),
        });
    }
    for (i, (op, r)) in ops.iter().zip(&results).enumerate() {
        if *r != 0 {
            return Err(TransparentError::StubCall {
                domid: replica,
                index: i,
                what: op.what.clone(),
                problem: format!("returned {}", *r as i64),
            });
        }
        if let Some((off, want)) = op.expect_port {
            let at = i * ARG_LEN + off;
            let got = args
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .unwrap_or(0);
            if got != want {
                return Err(TransparentError::StubCall {
                    domid: replica,
                    index: i,
                    what: op.what.clone(),
                    problem: format!("gave port {got}, the guest's is {want}"),
                });
            }
        }
    }
    // the guest's vcpu_info bytes back, with an upcall pending
    for (gfn, off, mut p) in vcpu_info_pages {
        if let Some(b) = p.get_mut(off) {
            *b = 1;
        }
        hv.write_page(replica, gfn, &p)
            .map_err(|e| xen("putting back vcpu_info", e))?;
    }
    let ports_after = read_ports(hv, replica)?;
    let full = context_with_upcall(&staged.hvm_context, UPCALL_VECTOR)?;
    hv.set_hvm_context(replica, &full)
        .map_err(|e| xen("loading the checkpoint's context", e))?;
    let total_ms = t0.elapsed().as_secs_f64() * 1000.0;
    if !keep_paused {
        hv.unpause(replica).map_err(|e| xen("unpausing", e))?;
    }
    Ok(ResurrectReport {
        domid: replica,
        seq: staged.seq,
        kept_ports: kept,
        stub_calls: ops.len(),
        stub_gfns: gfns.to_vec(),
        ports_after,
        stub_ms,
        total_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::super::pvstate::{FrameOffset, PV_STATE_VERSION};
    use super::*;

    fn entry(port: Port, vcpu: u32, kind: PortKind) -> PortEntry {
        PortEntry { port, vcpu, kind }
    }

    fn linux_pvh() -> PvState {
        PvState {
            version: PV_STATE_VERSION,
            domid: 1,
            vcpus: 1,
            ports: vec![
                entry(
                    1,
                    0,
                    PortKind::Interdomain {
                        remote_dom: 0,
                        remote_port: 10,
                    },
                ),
                entry(
                    2,
                    0,
                    PortKind::Interdomain {
                        remote_dom: 0,
                        remote_port: 11,
                    },
                ),
                entry(3, 0, PortKind::Virq { virq: VIRQ_TIMER }),
                entry(4, 0, PortKind::Ipi),
                entry(6, 0, PortKind::Unbound { remote_dom: 0 }),
            ],
            callback_irq: 0,
            shared_info_gfn: 0x1000,
            vcpu_info: vec![FrameOffset {
                gfn: 0x7a31,
                offset: 0x3c0,
            }],
            fifo_control: vec![FrameOffset {
                gfn: 0x51b3,
                offset: 0,
            }],
            fifo_array: vec![0x520f],
        }
    }

    fn replica_ports() -> Vec<PortEntry> {
        vec![
            entry(
                1,
                0,
                PortKind::Interdomain {
                    remote_dom: 0,
                    remote_port: 20,
                },
            ),
            entry(
                2,
                0,
                PortKind::Interdomain {
                    remote_dom: 0,
                    remote_port: 21,
                },
            ),
            entry(5, 0, PortKind::Unbound { remote_dom: 0 }),
        ]
    }

    #[test]
    fn plan_rebuilds_ports_in_order_with_placeholders() {
        let pv = linux_pvh();
        let ops = plan(9, &pv, &replica_ports(), &HashSet::new()).unwrap();
        let whats: Vec<&str> = ops.iter().map(|o| o.what.as_str()).collect();
        assert_eq!(
            whats,
            vec![
                "close port 5 (not the guest's)",
                "init_control vcpu 0 at 0x51b3+0x0",
                "expand_array 0x520f",
                "bind_virq 0 vcpu 0 -> port 3",
                "bind_ipi vcpu 0 -> port 4",
                "placeholder port 5",
                "alloc_unbound for domain 0 -> port 6",
                "close port 5 (placeholder)",
                "set_priority port 3 0",
                "register_vcpu_info vcpu 0 at 0x7a31+0x3c0",
                "set_evtchn_upcall_vector vcpu 0 0xf3",
                "unmask port 1",
                "unmask port 2",
                "unmask port 3",
                "unmask port 4",
                "unmask port 6",
            ]
        );
        let virq = &ops[3];
        assert_eq!(virq.nr, HYPERCALL_EVENT_CHANNEL_OP);
        assert_eq!(virq.a1, EVTCHNOP_BIND_VIRQ);
        assert_eq!(virq.expect_port, Some((8, 3)));
        assert_eq!(&virq.arg[0..8], &[0, 0, 0, 0, 0, 0, 0, 0]);
        let au = &ops[6];
        assert_eq!(&au.arg[0..4], &[0xf0, 0x7f, 0, 0]);
        // masked ports stay masked; a global callback needs no per-vCPU vector
        let mut pv2 = pv.clone();
        pv2.callback_irq = (2u64 << 56) | 0xf3;
        let masked: HashSet<Port> = [4].into_iter().collect();
        // Linux's marker value 1 (GSI 1) with per-vCPU vectors: the stub sets the vector
        let mut pv1 = pv.clone();
        pv1.callback_irq = 1;
        let ops1 = plan(9, &pv1, &replica_ports(), &HashSet::new()).unwrap();
        assert_eq!(ops1.iter().filter(|o| o.nr == HYPERCALL_HVM_OP).count(), 1);
        let ops = plan(9, &pv2, &replica_ports(), &masked).unwrap();
        assert!(!ops.iter().any(|o| o.what == "unmask port 4"));
        assert!(!ops.iter().any(|o| o.nr == HYPERCALL_HVM_OP));
    }

    #[test]
    fn plan_refuses_what_it_cannot_rebuild() {
        let mut pv = linux_pvh();
        pv.ports.push(entry(7, 0, PortKind::Pirq { pirq: 9 }));
        let e = plan(9, &pv, &replica_ports(), &HashSet::new()).unwrap_err();
        assert!(e.to_string().contains("physical IRQ 9"), "{e}");
        let mut pv = linux_pvh();
        pv.fifo_control.clear();
        assert!(plan(9, &pv, &replica_ports(), &HashSet::new()).is_err());
    }

    #[test]
    fn calls_made_counts_calls_that_returned_zero() {
        assert_eq!(calls_made(&[NOT_RUN; 4]), 0);
        assert_eq!(calls_made(&[0, 0, NOT_RUN, NOT_RUN]), 2);
        assert_eq!(calls_made(&[0, (-22i64) as u64, NOT_RUN]), 2);
        assert_eq!(calls_made(&[0, 5, 0]), 3);
    }

    #[test]
    fn stub_pages_hold_code_table_and_identity_map() {
        let gfns: [Pfn; STUB_PAGES] = [
            0x100, 0x101, 0x102, 0x103, 0x104, 0x105, 0x106, 0x107, 0x108,
        ];
        let ops = plan(9, &linux_pvh(), &replica_ports(), &HashSet::new()).unwrap();
        let p = stub_pages(&gfns, &ops, HypercallInsn::Vmcall);
        assert_eq!(&p[0][STUB_INSN_AT..STUB_INSN_AT + 3], &[0x0f, 0x01, 0xc1]);
        // entry 3: bind_virq, argument slot 3
        assert_eq!(get_u64(&p[1], 3 * ENTRY_LEN), HYPERCALL_EVENT_CHANNEL_OP);
        assert_eq!(get_u64(&p[1], 3 * ENTRY_LEN + 16), (0x102 << 12) + 3 * 32);
        // register_vcpu_info: a2 = vcpu, a3 = argument
        assert_eq!(get_u64(&p[1], 9 * ENTRY_LEN + 16), 0);
        assert_eq!(get_u64(&p[1], 9 * ENTRY_LEN + 24), (0x102 << 12) + 9 * 32);
        assert_eq!(get_u64(&p[2], 9 * 32), 0x7a31);
        assert_eq!(get_u64(&p[1], ops.len() * ENTRY_LEN), u64::MAX);
        for i in 0..ops.len() {
            assert_eq!(get_u64(&p[1], i * ENTRY_LEN + 32), NOT_RUN, "entry {i}");
        }
        // 0x100000 (the code's page) -> PD 0 entry 0; 3 GiB + 2 MiB -> PD 3 entry 1
        assert_eq!(get_u64(&p[3], 0), (0x104 << 12) | 3);
        assert_eq!(get_u64(&p[4], 3 * 8), (0x108 << 12) | 3);
        assert_eq!(get_u64(&p[8], 8), ((3u64 << 30) + (2 << 20)) | 0x83);
    }

    #[test]
    fn contexts_for_the_stub_and_the_upcall() {
        let mut cpu = vec![0u8; CPU_LEN];
        set_u64(&mut cpu, CPU_EFER, 0xd01);
        set_u64(&mut cpu, CPU_RIP, 0xffff_ffff_8100_0000);
        set_u64(&mut cpu, CPU_RFLAGS, 0x246);
        let mut lapic = vec![0u8; 1024];
        lapic[0x270] = 0x01;
        let mut b = hvm_save::HvmContextBuilder::new();
        b.push(hvm_save::HVM_SAVE_HEADER, 0, &[7; 24]).unwrap();
        b.push(hvm_save::HVM_SAVE_CPU, 0, &cpu).unwrap();
        b.push(HVM_SAVE_LAPIC_REGS, 0, &lapic).unwrap();
        let staged = b.finish();
        let gfns: [Pfn; STUB_PAGES] = [
            0x100, 0x101, 0x102, 0x103, 0x104, 0x105, 0x106, 0x107, 0x108,
        ];
        let s = stub_context(9, &staged, &gfns).unwrap();
        let recs = hvm_save::parse(&s).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(get_u64(recs[1].body, CPU_RIP), 0x100 << 12);
        assert_eq!(get_u64(recs[1].body, CPU_RBX), 0x101 << 12);
        assert_eq!(get_u64(recs[1].body, CPU_CR3), 0x103 << 12);
        assert_eq!(get_u64(recs[1].body, CPU_RFLAGS), 0x2);
        let full = context_with_upcall(&staged, UPCALL_VECTOR).unwrap();
        let l = hvm_save::find(&full, HVM_SAVE_LAPIC_REGS, 0)
            .unwrap()
            .unwrap();
        assert_eq!(
            u32::from_le_bytes(l[0x270..0x274].try_into().unwrap()),
            1 | (1 << 19)
        );
        assert_eq!(
            hvm_save::find(&full, hvm_save::HVM_SAVE_CPU, 0)
                .unwrap()
                .unwrap(),
            &cpu[..]
        );
        // not in long mode: refused
        let mut cpu32 = cpu.clone();
        set_u64(&mut cpu32, CPU_EFER, 0);
        let mut b = hvm_save::HvmContextBuilder::new();
        b.push(hvm_save::HVM_SAVE_HEADER, 0, &[7; 24]).unwrap();
        b.push(hvm_save::HVM_SAVE_CPU, 0, &cpu32).unwrap();
        assert!(stub_context(9, &b.finish(), &gfns).is_err());
    }

    #[test]
    fn vendor_from_cpuinfo() {
        assert_eq!(
            HypercallInsn::from_cpuinfo("processor\t: 0\nvendor_id\t: AuthenticAMD\n"),
            Some(HypercallInsn::Vmmcall)
        );
        assert_eq!(
            HypercallInsn::from_cpuinfo("vendor_id : GenuineIntel"),
            Some(HypercallInsn::Vmcall)
        );
        assert_eq!(HypercallInsn::from_cpuinfo("nothing"), None);
    }
}
