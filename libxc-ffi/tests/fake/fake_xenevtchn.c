/*
 * A fake libxenevtchn for libxc-ffi's tests (real prototypes from /usr/include/xenevtchn.h).
 * Notifying a bound port makes it pending on the same handle (a loopback), through a pipe
 * whose read end is the handle's pollable fd.
 */
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>
#include <xenevtchn.h>

#define MAXPORTS 64

struct xenevtchn_handle {
    int pipe[2];
    int bound[MAXPORTS];
    int next_port;
};

int fake_live_handles;
int fake_unmasked_port = -1;

xenevtchn_handle *xenevtchn_open(struct xentoollog_logger *logger, unsigned int flags)
{
    (void)logger;
    if (flags != 0) { errno = EINVAL; return NULL; }
    xenevtchn_handle *h = calloc(1, sizeof(*h));
    if (!h) return NULL;
    if (pipe(h->pipe)) { free(h); return NULL; }
    h->next_port = 5;
    fake_live_handles++;
    return h;
}

int xenevtchn_close(xenevtchn_handle *xce)
{
    close(xce->pipe[0]);
    close(xce->pipe[1]);
    free(xce);
    fake_live_handles--;
    return 0;
}

int xenevtchn_fd(xenevtchn_handle *xce) { return xce->pipe[0]; }

static int alloc_port(xenevtchn_handle *xce, uint32_t domid)
{
    if (domid == 999) { errno = ESRCH; return -1; }
    if (xce->next_port >= MAXPORTS) { errno = ENOSPC; return -1; }
    int p = xce->next_port++;
    xce->bound[p] = 1;
    return p;
}

xenevtchn_port_or_error_t xenevtchn_bind_unbound_port(xenevtchn_handle *xce, uint32_t domid)
{
    return alloc_port(xce, domid);
}

xenevtchn_port_or_error_t xenevtchn_bind_interdomain(xenevtchn_handle *xce, uint32_t domid,
                                                     evtchn_port_t remote_port)
{
    if (remote_port == 0) { errno = EINVAL; return -1; }
    return alloc_port(xce, domid);
}

int xenevtchn_unbind(xenevtchn_handle *xce, evtchn_port_t port)
{
    if (port >= MAXPORTS || !xce->bound[port]) { errno = EINVAL; return -1; }
    xce->bound[port] = 0;
    return 0;
}

int xenevtchn_notify(xenevtchn_handle *xce, evtchn_port_t port)
{
    if (port >= MAXPORTS || !xce->bound[port]) { errno = EINVAL; return -1; }
    uint32_t p = port;
    return write(xce->pipe[1], &p, sizeof(p)) == sizeof(p) ? 0 : -1;
}

xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *xce)
{
    uint32_t p;
    if (read(xce->pipe[0], &p, sizeof(p)) != sizeof(p)) return -1;
    return (int)p;
}

int xenevtchn_unmask(xenevtchn_handle *xce, evtchn_port_t port)
{
    if (port >= MAXPORTS || !xce->bound[port]) { errno = EINVAL; return -1; }
    fake_unmasked_port = (int)port;
    return 0;
}
