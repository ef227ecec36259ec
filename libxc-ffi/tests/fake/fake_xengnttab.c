/*
 * A fake libxengnttab for libxc-ffi's tests (real prototypes from /usr/include/xengnttab.h).
 * "Granted" pages are anonymous memory filled with a pattern: u32 ref at offset 0, u32 domid
 * at offset 4, then bytes (ref & 0xff).  Grant ref 0xdead is invalid.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <xengnttab.h>

struct xengntdev_handle { int max_grants; };

int fake_live_handles;
int fake_live_pages;
int fake_max_grants;

xengnttab_handle *xengnttab_open(struct xentoollog_logger *logger, unsigned open_flags)
{
    (void)logger;
    if (open_flags != 0) { errno = EINVAL; return NULL; }
    xengnttab_handle *h = calloc(1, sizeof(*h));
    if (h) fake_live_handles++;
    return h;
}

int xengnttab_close(xengnttab_handle *xgt)
{
    free(xgt);
    fake_live_handles--;
    return 0;
}

int xengnttab_set_max_grants(xengnttab_handle *xgt, uint32_t nr_grants)
{
    if (nr_grants == 0) { errno = EINVAL; return -1; }
    xgt->max_grants = (int)nr_grants;
    fake_max_grants = (int)nr_grants;
    return 0;
}

void *xengnttab_map_grant_refs(xengnttab_handle *xgt, uint32_t count, uint32_t *domids,
                               uint32_t *refs, int prot)
{
    (void)xgt;
    for (uint32_t i = 0; i < count; i++)
        if (refs[i] == 0xdead) { errno = EINVAL; return NULL; }
    unsigned char *p = mmap(NULL, (size_t)count * 4096, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    for (uint32_t i = 0; i < count; i++) {
        unsigned char *pg = p + (size_t)i * 4096;
        memset(pg, refs[i] & 0xff, 4096);
        memcpy(pg, &refs[i], 4);
        memcpy(pg + 4, &domids[i], 4);
    }
    if (mprotect(p, (size_t)count * 4096, prot)) return NULL;
    fake_live_pages += (int)count;
    return p;
}

void *xengnttab_map_domain_grant_refs(xengnttab_handle *xgt, uint32_t count, uint32_t domid,
                                      uint32_t *refs, int prot)
{
    uint32_t domids[count];
    for (uint32_t i = 0; i < count; i++) domids[i] = domid;
    return xengnttab_map_grant_refs(xgt, count, domids, refs, prot);
}

void *xengnttab_map_grant_ref(xengnttab_handle *xgt, uint32_t domid, uint32_t ref, int prot)
{
    return xengnttab_map_grant_refs(xgt, 1, &domid, &ref, prot);
}

int xengnttab_unmap(xengnttab_handle *xgt, void *start_address, uint32_t count)
{
    (void)xgt;
    if (munmap(start_address, (size_t)count * 4096)) return -1;
    fake_live_pages -= (int)count;
    return 0;
}
