/*
 * A fake libxenstore for libxc-ffi's tests (real prototypes from /usr/include/xenstore.h):
 * a flat in-memory store, permissions per node, transactions whose commit fails with EAGAIN
 * as many times as the value last written to /fake/conflicts says, and watches queued on a
 * pipe (xs_fileno) like the real library's watch pipe.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <xenstore.h>

#define MAXN 128
#define MAXW 16
#define MAXQ 64

struct node { char *path; char *val; unsigned len; struct xs_permissions perms[4]; unsigned nperms; };
struct watch { char *path; char *token; };
struct event { char *path; char *token; };

struct xs_handle {
    struct node nodes[MAXN];
    struct watch watches[MAXW];
    struct event queue[MAXQ];
    int qhead, qtail;
    int pipe[2];
    xs_transaction_t next_tx;
    int conflicts;
};

int fake_live_handles;
int fake_commits;
int fake_aborts;

struct xs_handle *xs_open(unsigned long flags)
{
    if (flags != 0) { errno = EINVAL; return NULL; }
    struct xs_handle *h = calloc(1, sizeof(*h));
    if (!h) return NULL;
    if (pipe(h->pipe)) { free(h); return NULL; }
    h->next_tx = 1;
    fake_live_handles++;
    return h;
}

void xs_close(struct xs_handle *h)
{
    if (!h) return;
    for (int i = 0; i < MAXN; i++) { free(h->nodes[i].path); free(h->nodes[i].val); }
    for (int i = 0; i < MAXW; i++) { free(h->watches[i].path); free(h->watches[i].token); }
    for (int i = h->qhead; i < h->qtail; i++) { free(h->queue[i].path); free(h->queue[i].token); }
    close(h->pipe[0]);
    close(h->pipe[1]);
    free(h);
    fake_live_handles--;
}

static struct node *find(struct xs_handle *h, const char *path)
{
    for (int i = 0; i < MAXN; i++)
        if (h->nodes[i].path && !strcmp(h->nodes[i].path, path)) return &h->nodes[i];
    return NULL;
}

static int under(const char *parent, const char *child)
{
    size_t n = strlen(parent);
    return !strncmp(parent, child, n) && (child[n] == 0 || child[n] == '/');
}

static void fire(struct xs_handle *h, const char *path)
{
    for (int i = 0; i < MAXW; i++) {
        struct watch *w = &h->watches[i];
        if (!w->path || !under(w->path, path) || h->qtail >= MAXQ) continue;
        h->queue[h->qtail].path = strdup(path);
        h->queue[h->qtail].token = strdup(w->token);
        h->qtail++;
        if (write(h->pipe[1], "!", 1) != 1) abort();
    }
}

static struct node *set(struct xs_handle *h, const char *path, const void *data, unsigned len)
{
    struct node *n = find(h, path);
    if (!n) {
        for (int i = 0; i < MAXN && !n; i++)
            if (!h->nodes[i].path) n = &h->nodes[i];
        if (!n) { errno = ENOSPC; return NULL; }
        n->path = strdup(path);
        n->perms[0].id = 0;
        n->perms[0].perms = XS_PERM_NONE;
        n->nperms = 1;
    }
    free(n->val);
    n->val = malloc(len + 1);
    memcpy(n->val, data, len);
    n->val[len] = 0;
    n->len = len;
    if (!strcmp(path, "/fake/conflicts")) h->conflicts = atoi(n->val);
    fire(h, path);
    return n;
}

void *xs_read(struct xs_handle *h, xs_transaction_t t, const char *path, unsigned int *len)
{
    (void)t;
    struct node *n = find(h, path);
    if (!n) { errno = ENOENT; return NULL; }
    char *v = malloc(n->len + 1);
    memcpy(v, n->val, n->len + 1);
    if (len) *len = n->len;
    return v;
}

bool xs_write(struct xs_handle *h, xs_transaction_t t, const char *path, const void *data,
              unsigned int len)
{
    (void)t;
    if (path[0] != '/') { errno = EINVAL; return false; }
    return set(h, path, data, len) != NULL;
}

bool xs_mkdir(struct xs_handle *h, xs_transaction_t t, const char *path)
{
    (void)t;
    if (path[0] != '/') { errno = EINVAL; return false; }
    return find(h, path) || set(h, path, "", 0);
}

bool xs_rm(struct xs_handle *h, xs_transaction_t t, const char *path)
{
    (void)t;
    if (!find(h, path)) { errno = ENOENT; return false; }
    for (int i = 0; i < MAXN; i++) {
        struct node *n = &h->nodes[i];
        if (n->path && under(path, n->path)) {
            free(n->path); free(n->val);
            memset(n, 0, sizeof(*n));
        }
    }
    fire(h, path);
    return true;
}

char **xs_directory(struct xs_handle *h, xs_transaction_t t, const char *path, unsigned int *num)
{
    (void)t;
    if (!find(h, path)) { errno = ENOENT; return NULL; }
    size_t plen = strlen(path), bytes = 0;
    unsigned n = 0;
    for (int i = 0; i < MAXN; i++) {
        const char *p = h->nodes[i].path;
        if (p && !strncmp(p, path, plen) && p[plen] == '/' && !strchr(p + plen + 1, '/')) {
            n++;
            bytes += strlen(p + plen + 1) + 1;
        }
    }
    char **vec = malloc(n * sizeof(char *) + bytes + 1);
    char *s = (char *)(vec + n);
    unsigned k = 0;
    for (int i = 0; i < MAXN; i++) {
        const char *p = h->nodes[i].path;
        if (p && !strncmp(p, path, plen) && p[plen] == '/' && !strchr(p + plen + 1, '/')) {
            strcpy(s, p + plen + 1);
            vec[k++] = s;
            s += strlen(s) + 1;
        }
    }
    *num = n;
    return vec;
}

struct xs_permissions *xs_get_permissions(struct xs_handle *h, xs_transaction_t t,
                                          const char *path, unsigned int *num)
{
    (void)t;
    struct node *n = find(h, path);
    if (!n) { errno = ENOENT; return NULL; }
    struct xs_permissions *p = malloc(n->nperms * sizeof(*p));
    memcpy(p, n->perms, n->nperms * sizeof(*p));
    *num = n->nperms;
    return p;
}

bool xs_set_permissions(struct xs_handle *h, xs_transaction_t t, const char *path,
                        struct xs_permissions *perms, unsigned int num_perms)
{
    (void)t;
    struct node *n = find(h, path);
    if (!n) { errno = ENOENT; return false; }
    if (num_perms == 0 || num_perms > 4) { errno = EINVAL; return false; }
    memcpy(n->perms, perms, num_perms * sizeof(*perms));
    n->nperms = num_perms;
    return true;
}

xs_transaction_t xs_transaction_start(struct xs_handle *h) { return h->next_tx++; }

bool xs_transaction_end(struct xs_handle *h, xs_transaction_t t, bool abort_)
{
    if (t == XBT_NULL || t >= h->next_tx) { errno = ENOENT; return false; }
    if (abort_) { fake_aborts++; return true; }
    if (h->conflicts > 0) { h->conflicts--; errno = EAGAIN; return false; }
    fake_commits++;
    return true;
}

bool xs_watch(struct xs_handle *h, const char *path, const char *token)
{
    for (int i = 0; i < MAXW; i++) {
        if (!h->watches[i].path) {
            h->watches[i].path = strdup(path);
            h->watches[i].token = strdup(token);
            /* Like xenstored: a new watch fires once right away, for its own path. */
            struct watch only = h->watches[i];
            struct watch saved[MAXW];
            memcpy(saved, h->watches, sizeof(saved));
            memset(h->watches, 0, sizeof(h->watches));
            h->watches[0] = only;
            fire(h, path);
            memcpy(h->watches, saved, sizeof(saved));
            return true;
        }
    }
    errno = ENOSPC;
    return false;
}

bool xs_unwatch(struct xs_handle *h, const char *path, const char *token)
{
    for (int i = 0; i < MAXW; i++) {
        struct watch *w = &h->watches[i];
        if (w->path && !strcmp(w->path, path) && !strcmp(w->token, token)) {
            free(w->path); free(w->token);
            w->path = w->token = NULL;
            return true;
        }
    }
    errno = ENOENT;
    return false;
}

int xs_fileno(struct xs_handle *h) { return h->pipe[0]; }

static char **pop(struct xs_handle *h)
{
    if (h->qhead == h->qtail) { errno = EAGAIN; return NULL; }
    struct event *e = &h->queue[h->qhead++];
    char c;
    if (read(h->pipe[0], &c, 1) != 1) abort();
    size_t lp = strlen(e->path) + 1, lt = strlen(e->token) + 1;
    char **vec = malloc(2 * sizeof(char *) + lp + lt);
    char *s = (char *)(vec + 2);
    memcpy(s, e->path, lp);
    memcpy(s + lp, e->token, lt);
    vec[XS_WATCH_PATH] = s;
    vec[XS_WATCH_TOKEN] = s + lp;
    free(e->path); free(e->token);
    return vec;
}

char **xs_check_watch(struct xs_handle *h) { return pop(h); }

char **xs_read_watch(struct xs_handle *h, unsigned int *num)
{
    char **v = pop(h);
    if (!v) { errno = EINTR; return NULL; } /* the real one would block */
    *num = 2;
    return v;
}

char *xs_get_domain_path(struct xs_handle *h, unsigned int domid)
{
    (void)h;
    char *s = NULL;
    if (domid >= 0x7ff0) { errno = EINVAL; return NULL; }
    if (asprintf(&s, "/local/domain/%u", domid) < 0) return NULL;
    return s;
}
