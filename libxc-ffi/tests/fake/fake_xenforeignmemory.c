/*
 * A fake libxenforeignmemory for libxc-ffi's tests (real prototypes from
 * /usr/include/xenforeignmemory.h).  Page i of a mapping holds the u64 pfn at offset 0;
 * pfn 0xbad fails with -EFAULT in the per-page error array.  Resources: only
 * XENMEM_resource_grant_table (32 frames), frame f holding the u64 0x6000 + f.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <xenforeignmemory.h>
#include <xen/memory.h>

struct xenforeignmemory_handle { int unused; };
struct xenforeignmemory_resource_handle { void *addr; unsigned long nr; };

int fake_live_handles;
int fake_live_pages;

xenforeignmemory_handle *xenforeignmemory_open(struct xentoollog_logger *logger,
                                               unsigned open_flags)
{
    (void)logger;
    if (open_flags != 0) { errno = EINVAL; return NULL; }
    xenforeignmemory_handle *h = calloc(1, sizeof(*h));
    if (h) fake_live_handles++;
    return h;
}

int xenforeignmemory_close(xenforeignmemory_handle *fmem)
{
    free(fmem);
    fake_live_handles--;
    return 0;
}

void *xenforeignmemory_map(xenforeignmemory_handle *fmem, uint32_t dom, int prot, size_t pages,
                           const xen_pfn_t arr[], int err[])
{
    (void)fmem;
    if (dom == 999) { errno = ESRCH; return NULL; }
    unsigned char *p = mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    for (size_t i = 0; i < pages; i++) {
        err[i] = arr[i] == 0xbad ? -EFAULT : 0;
        memcpy(p + i * 4096, &arr[i], sizeof(arr[i]));
    }
    if (mprotect(p, pages * 4096, prot)) return NULL;
    fake_live_pages += (int)pages;
    return p;
}

int xenforeignmemory_unmap(xenforeignmemory_handle *fmem, void *addr, size_t pages)
{
    (void)fmem;
    if (munmap(addr, pages * 4096)) return -1;
    fake_live_pages -= (int)pages;
    return 0;
}

xenforeignmemory_resource_handle *xenforeignmemory_map_resource(
    xenforeignmemory_handle *fmem, domid_t domid, unsigned int type, unsigned int id,
    unsigned long frame, unsigned long nr_frames, void **paddr, int prot, int flags)
{
    (void)fmem; (void)domid; (void)id;
    if (type != XENMEM_resource_grant_table || flags != 0 || *paddr != NULL) {
        errno = EOPNOTSUPP;
        return NULL;
    }
    if (frame + nr_frames > 32) { errno = EINVAL; return NULL; }
    unsigned char *p = mmap(NULL, nr_frames * 4096, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    for (unsigned long f = 0; f < nr_frames; f++) {
        uint64_t v = 0x6000 + frame + f;
        memcpy(p + f * 4096, &v, sizeof(v));
    }
    if (mprotect(p, nr_frames * 4096, prot)) return NULL;
    xenforeignmemory_resource_handle *r = malloc(sizeof(*r));
    r->addr = p;
    r->nr = nr_frames;
    *paddr = p;
    fake_live_pages += (int)nr_frames;
    return r;
}

int xenforeignmemory_unmap_resource(xenforeignmemory_handle *fmem,
                                    xenforeignmemory_resource_handle *fres)
{
    (void)fmem;
    munmap(fres->addr, fres->nr * 4096);
    fake_live_pages -= (int)fres->nr;
    free(fres);
    return 0;
}

int xenforeignmemory_resource_size(xenforeignmemory_handle *fmem, domid_t domid,
                                   unsigned int type, unsigned int id, size_t *size)
{
    (void)fmem; (void)domid; (void)id;
    if (type != XENMEM_resource_grant_table) { errno = EOPNOTSUPP; return -1; }
    *size = 32 * 4096;
    return 0;
}
