/*
 * A fake libxenctrl for libxc-ffi's tests: the functions libxc-ffi loads, with the real
 * 4.17 prototypes (compiled against /usr/include/xenctrl.h, so a prototype or structure
 * mismatch is a compile error), backed by a tiny in-memory "hypervisor".
 * Built by tests/fake.rs with cc; FAKE_VERSION selects what xc_version reports.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <xenctrl.h>

#ifndef FAKE_VERSION
#define FAKE_VERSION ((4 << 16) | 17)
#endif

#define NDOMS 300 /* more than one getinfolist batch of libxc-ffi (256) */
/* A well-formed HVM context: HEADER, CPU for vCPUs 0 and 1, END. */
#define CTX_SIZE (int)(2 * sizeof(struct hvm_save_descriptor) + sizeof(struct hvm_save_header) + \
                       2 * (sizeof(struct hvm_save_descriptor) + sizeof(struct hvm_hw_cpu)))

struct xc_interface_core {
    int paused[NDOMS];
    int logdirty[NDOMS];
    uint64_t params[NDOMS][HVM_NR_PARAMS];
};

/* Observable from the tests through dlsym. */
int fake_live_handles;
int fake_live_buffers;
int fake_last_setcontext_size;
unsigned fake_last_logdirty_mode;

/* Domain ids: 0, then 3, 5, 7, ... (gaps on purpose). */
static int dom_index(uint32_t domid)
{
    if (domid == 0) return 0;
    if (domid % 2 == 0 || domid < 3) return -1;
    int i = (int)(domid - 1) / 2;
    return i < NDOMS ? i : -1;
}
static uint32_t dom_id(int i) { return i == 0 ? 0 : 2 * (uint32_t)i + 1; }

xc_interface *xc_interface_open(xentoollog_logger *logger, xentoollog_logger *dombuild_logger,
                                unsigned open_flags)
{
    (void)dombuild_logger;
    if (open_flags != 0 || !logger || !logger->vmessage) { errno = EINVAL; return NULL; }
#ifdef FAKE_OPEN_FAILS
    errno = EACCES;
    return NULL;
#endif
    xc_interface *xch = calloc(1, sizeof(*xch));
    if (xch) fake_live_handles++;
    return xch;
}

int xc_interface_close(xc_interface *xch)
{
    free(xch);
    fake_live_handles--;
    return 0;
}

int xc_version(xc_interface *xch, int cmd, void *arg)
{
    (void)xch;
    switch (cmd) {
    case XENVER_version: return FAKE_VERSION;
    case XENVER_extraversion: strcpy(arg, ".7-fake"); return 0;
    default: errno = ENOSYS; return -1;
    }
}

int xc_domain_getinfolist(xc_interface *xch, uint32_t first_domain, unsigned int max_domains,
                          xc_domaininfo_t *info)
{
    unsigned n = 0;
    for (int i = 0; i < NDOMS && n < max_domains; i++) {
        uint32_t d = dom_id(i);
        if (d < first_domain) continue;
        xc_domaininfo_t *o = &info[n++];
        memset(o, 0, sizeof(*o));
        o->domain = (domid_t)d;
        o->flags = xch->paused[i] ? XEN_DOMINF_paused : XEN_DOMINF_running;
        if (d != 0) {
            o->flags |= XEN_DOMINF_hvm_guest | XEN_DOMINF_hap;
            /* What Xen accepts for domUs: PVH = LAPIC only, HVM = all but vPCI. */
            o->arch_config.emulation_flags =
                d % 4 == 1 ? XEN_X86_EMU_LAPIC : (XEN_X86_EMU_ALL & ~XEN_X86_EMU_VPCI);
        }
        if (d == 7)
            o->flags |= XEN_DOMINF_shutdown | (SHUTDOWN_crash << XEN_DOMINF_shutdownshift);
        o->tot_pages = 1000 + d;
        o->max_pages = 2000 + d;
        o->shared_info_frame = 0xfeff0 + d;
        o->cpu_time = 123456789ULL * d;
        o->nr_online_vcpus = 2;
        o->max_vcpu_id = d == 5 ? XEN_INVALID_MAX_VCPU_ID : 1;
        for (int b = 0; b < 16; b++) o->handle[b] = (uint8_t)(d + b);
    }
    return (int)n;
}

static int find(uint32_t domid)
{
    int i = dom_index(domid);
    if (i < 0) errno = ESRCH;
    return i;
}

int xc_domain_pause(xc_interface *xch, uint32_t domid)
{
    int i = find(domid);
    if (i < 0) return -1;
    xch->paused[i] = 1;
    return 0;
}

int xc_domain_unpause(xc_interface *xch, uint32_t domid)
{
    int i = find(domid);
    if (i < 0) return -1;
    xch->paused[i] = 0;
    return 0;
}

void *xc__hypercall_buffer_alloc_pages(xc_interface *xch, xc_hypercall_buffer_t *b, int nr_pages)
{
    (void)xch;
    /* What DECLARE_HYPERCALL_BUFFER sets up. */
    if (b->hbuf || b->param_shadow || b->dir || b->ubuf != (void *)-1 || b->sz) {
        errno = EINVAL;
        return NULL;
    }
    void *p = mmap(NULL, (size_t)nr_pages * 4096, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    memset(p, 0xee, (size_t)nr_pages * 4096); /* stale junk, like a reused buffer */
    b->hbuf = p;
    fake_live_buffers++;
    return p;
}

void xc__hypercall_buffer_free_pages(xc_interface *xch, xc_hypercall_buffer_t *b, int nr_pages)
{
    (void)xch;
    munmap(b->hbuf, (size_t)nr_pages * 4096);
    b->hbuf = NULL;
    fake_live_buffers--;
}

long long xc_logdirty_control(xc_interface *xch, uint32_t domid, unsigned int sop,
                              xc_hypercall_buffer_t *dirty_bitmap, unsigned long pages,
                              unsigned int mode, xc_shadow_op_stats_t *stats)
{
    int i = find(domid);
    if (i < 0) return -1;
    fake_last_logdirty_mode = mode;
    switch (sop) {
    case XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY:
        if (domid == 0) { errno = EOPNOTSUPP; return -1; }
        xch->logdirty[i] = 1;
        return 0;
    case XEN_DOMCTL_SHADOW_OP_OFF:
        xch->logdirty[i] = 0;
        return 0;
    case XEN_DOMCTL_SHADOW_OP_CLEAN:
    case XEN_DOMCTL_SHADOW_OP_PEEK: {
        if (!xch->logdirty[i]) { errno = EINVAL; return -1; }
        if (!dirty_bitmap || !dirty_bitmap->hbuf) { errno = EFAULT; return -1; }
        /* Like Xen, write (copy or clear) whole bytes up to the pages covered, and report
         * fewer pages than asked when the guest is smaller: domain 9 has 1001 pages. */
        unsigned long covered = domid == 9 && pages > 1001 ? 1001 : pages;
        uint8_t *bm = dirty_bitmap->hbuf;
        memset(bm, 0, (covered + 7) / 8);
        uint32_t dirty = 0;
        for (unsigned long pfn = 3; pfn < covered; pfn += 7) {
            bm[pfn / 8] |= (uint8_t)(1u << (pfn % 8));
            dirty++;
        }
        if (stats) {
            stats->dirty_count = dirty;
            stats->fault_count = sop == XEN_DOMCTL_SHADOW_OP_CLEAN ? 42 : 0;
        }
        return (long long)covered;
    }
    default:
        errno = EINVAL;
        return -1;
    }
}

static void fill_cpu(struct hvm_hw_cpu *c, uint16_t instance)
{
    memset(c, 0, sizeof(*c));
    c->rip = 0xfff0 + instance;
    c->cr3 = 0x1000;
    c->tsc = 0x1122334455667788ULL;
}

static uint8_t *put(uint8_t *p, uint16_t code, uint16_t inst, uint32_t len)
{
    struct hvm_save_descriptor d = { .typecode = code, .instance = inst, .length = len };
    memcpy(p, &d, sizeof(d));
    return p + sizeof(d);
}

int xc_domain_hvm_getcontext(xc_interface *xch, uint32_t domid, uint8_t *ctxt_buf, uint32_t size)
{
    (void)xch;
    if (find(domid) < 0) return -1;
    if (!ctxt_buf) return CTX_SIZE;
    if (size < (uint32_t)CTX_SIZE) { errno = ENOSPC; return -1; }
    uint8_t *p = put(ctxt_buf, 1, 0, sizeof(struct hvm_save_header));
    struct hvm_save_header h = { .magic = HVM_FILE_MAGIC, .version = HVM_FILE_VERSION };
    memcpy(p, &h, sizeof(h));
    p += sizeof(h);
    for (uint16_t v = 0; v < 2; v++) {
        struct hvm_hw_cpu c;
        p = put(p, 2, v, sizeof(c));
        fill_cpu(&c, v);
        memcpy(p, &c, sizeof(c));
        p += sizeof(c);
    }
    put(p, 0, 0, 0);
    return CTX_SIZE;
}

int xc_domain_hvm_getcontext_partial(xc_interface *xch, uint32_t domid, uint16_t typecode,
                                     uint16_t instance, void *ctxt_buf, uint32_t size)
{
    (void)xch;
    if (find(domid) < 0) return -1;
    if (typecode != 2 || size < sizeof(struct hvm_hw_cpu) || instance > 1) {
        errno = ENOENT;
        return -1;
    }
    fill_cpu(ctxt_buf, instance);
    return 0;
}

int xc_domain_hvm_setcontext(xc_interface *xch, uint32_t domid, uint8_t *hvm_ctxt, uint32_t size)
{
    (void)xch;
    if (find(domid) < 0) return -1;
    fake_last_setcontext_size = (int)size;
    struct hvm_save_descriptor end;
    if (size != (uint32_t)CTX_SIZE) { errno = EINVAL; return -1; }
    memcpy(&end, hvm_ctxt + size - sizeof(end), sizeof(end));
    if (end.typecode != 0 || end.length != 0) { errno = EINVAL; return -1; }
    return 0;
}

int xc_vcpu_getcontext(xc_interface *xch, uint32_t domid, uint32_t vcpu,
                       vcpu_guest_context_any_t *ctxt)
{
    (void)xch;
    if (find(domid) < 0) return -1;
    if (vcpu > 1) { errno = EINVAL; return -1; }
    ctxt->x64.flags = VGCF_online;
    ctxt->x64.ctrlreg[3] = 0x1000 + vcpu;
    return 0;
}

int xc_hvm_param_set(xc_interface *handle, uint32_t dom, uint32_t param, uint64_t value)
{
    int i = find(dom);
    if (i < 0) return -1;
    if (param >= HVM_NR_PARAMS) { errno = EINVAL; return -1; }
    handle->params[i][param] = value;
    return 0;
}

int xc_hvm_param_get(xc_interface *handle, uint32_t dom, uint32_t param, uint64_t *value)
{
    int i = find(dom);
    if (i < 0) return -1;
    if (param >= HVM_NR_PARAMS) { errno = EINVAL; return -1; }
    *value = handle->params[i][param];
    return 0;
}

int xc_evtchn_status(xc_interface *xch, xc_evtchn_status_t *status)
{
    (void)xch;
    if (find(status->dom) < 0) return -1;
    status->vcpu = 0;
    switch (status->port) {
    case 1:
        status->status = EVTCHNSTAT_interdomain;
        status->u.interdomain.dom = 0;
        status->u.interdomain.port = 7;
        break;
    case 2:
        status->status = EVTCHNSTAT_unbound;
        status->u.unbound.dom = 0;
        break;
    case 3:
        status->status = EVTCHNSTAT_virq;
        status->u.virq = 5;
        status->vcpu = 1;
        break;
    case 4:
        status->status = EVTCHNSTAT_ipi;
        break;
    default:
        status->status = EVTCHNSTAT_closed;
    }
    return 0;
}

xc_evtchn_port_or_error_t xc_evtchn_alloc_unbound(xc_interface *xch, uint32_t dom,
                                                  uint32_t remote_dom)
{
    (void)xch;
    if (find(dom) < 0 || find(remote_dom) < 0) return -1;
    return 10;
}

int xc_domain_add_to_physmap(xc_interface *xch, uint32_t domid, unsigned int space,
                             unsigned long idx, xen_pfn_t gpfn)
{
    (void)xch; (void)idx; (void)gpfn;
    if (find(domid) < 0) return -1;
    if (space != XENMAPSPACE_grant_table) { errno = EINVAL; return -1; }
    return 0;
}

int xc_domain_maximum_gpfn(xc_interface *xch, uint32_t domid, xen_pfn_t *gpfns)
{
    (void)xch;
    if (find(domid) < 0) return -1;
    *gpfns = 0xfffff;
    return 0;
}
