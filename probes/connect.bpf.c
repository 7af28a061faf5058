/* connect: connect() to IPv4/IPv6 destinations and to Unix sockets (by path), and
 * datagrams sent with a destination (sendto/sendmsg/sendmmsg), each with the return value.
 *
 * Only the syscalls that carry an address are traced: socket() and close()
 * are not, because their tracepoints would run for every close on the host
 * (an open+close loop anywhere paid ~20% for it). So the socket type is known
 * only when the daemon's cgroup hooks run (enforce.bpf.c fills it into the
 * pending event); `ebpfmon trace` alone reports it as unknown.
 *
 * glibc's resolver connects its UDP socket to port 53 and then sends without
 * an address, so a connect to port 53 is remembered per (tgid, fd) and sends
 * without an address on that fd are reported too, with the head of the query
 * (user space decodes the name). Without close() the entry can outlive the
 * socket: a later socket on the same fd number that is never connected (an
 * accepted one) would have its sends taken for DNS; user space reports a
 * query name only when the payload parses as a DNS query.
 */
#define AF_UNIX_ 1
#define AF_INET_ 2
#define AF_INET6_ 10
#define UNIX_PATH_MAX_ 108
#define DNS_PORT 53
#define EINPROGRESS_ 115
#define EPERM_ 1

struct socket_key {
	u32 tgid;
	s32 fd;
};

struct dns_socket {  /* a socket connected to port 53 */
	u16 family;
	u8 addr[16];
};

BPF_TABLE("lru_hash", struct socket_key, struct dns_socket, dns_sockets, 4096);
BPF_PERCPU_ARRAY(sockaddr_scratch, struct sockaddr_event, 1);
BPF_TABLE("lru_hash", u32, struct sockaddr_event, sockaddr_pending, 1024);

/* user-space ABI of struct msghdr / struct iovec (not kernel structs) */
struct user_msghdr_head {
	void *name;
	int namelen;
	void *iov;
	u64 iovlen;
};

struct user_iovec {
	void *base;
	u64 len;
};

/* Starts an event in sockaddr_pending for this thread. */
static __always_inline struct sockaddr_event *sockaddr_begin(int fd)
{
	u32 zero = 0;
	struct sockaddr_event *blank = sockaddr_scratch.lookup(&zero);
	if (!blank)
		return NULL;
	u32 tid = (u32)bpf_get_current_pid_tgid();
	if (sockaddr_pending.update(&tid, blank) < 0)
		return NULL;
	struct sockaddr_event *e = sockaddr_pending.lookup(&tid);
	if (!e)
		return NULL;
	e->hdr.flags = 0;
	e->fd = fd;
	e->length = 0;
	e->payload_len = 0;
	__builtin_memset(e->addr, 0, sizeof(e->addr));
	e->sock_type = 0;  /* unknown, unless a cgroup hook fills it in */
	e->protocol = 0;
	return e;
}

static __always_inline void sockaddr_abandon(void)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	sockaddr_pending.delete(&tid);
}

/* Reads an AF_INET/AF_INET6 address from user memory; -1 for other families. */
static __always_inline int read_sockaddr(struct sockaddr_event *e, const void *uaddr, int addrlen)
{
	u16 family = 0;
	if (!uaddr || addrlen < 2 || bpf_probe_read_user(&family, sizeof(family), uaddr) < 0)
		return -1;
	if (family == AF_INET_ && addrlen >= 8) {
		u8 raw[8];
		if (bpf_probe_read_user(raw, sizeof(raw), uaddr) < 0)
			return -1;
		e->dport = (raw[2] << 8) | raw[3];
		__builtin_memcpy(e->addr, &raw[4], 4);
	} else if (family == AF_INET6_ && addrlen >= 24) {
		u8 raw[24];
		if (bpf_probe_read_user(raw, sizeof(raw), uaddr) < 0)
			return -1;
		e->dport = (raw[2] << 8) | raw[3];
		__builtin_memcpy(e->addr, &raw[8], 16);
	} else {
		return -1;
	}
	e->family = family;
	return 0;
}

/* A Unix socket's path, into the payload (a container runtime's API socket is a way out of
 * the agent's cgroup); an abstract name starts with a NUL. */
static __always_inline int read_unix_sockaddr(struct sockaddr_event *e, const void *uaddr, int addrlen)
{
	u16 family = 0;
	if (!uaddr || addrlen <= 2 || bpf_probe_read_user(&family, sizeof(family), uaddr) < 0 || family != AF_UNIX_)
		return -1;
	u32 n = addrlen > UNIX_PATH_MAX_ + 2 ? UNIX_PATH_MAX_ : (u32)addrlen - 2;
	n &= 127;  /* the verifier's bound; n is at most UNIX_PATH_MAX_ already */
	if (n == 0 || bpf_probe_read_user(e->payload, n, (const char *)uaddr + 2) < 0)
		return -1;
	e->family = AF_UNIX_;
	e->dport = 0;
	e->payload_len = n;
	return 0;
}

/* Takes the destination of a socket connected to port 53, for addressless sends. */
static __always_inline int use_connected_dns(struct sockaddr_event *e, int fd)
{
	struct socket_key key = {.tgid = bpf_get_current_pid_tgid() >> 32, .fd = fd};
	struct dns_socket *dns = dns_sockets.lookup(&key);
	if (!dns)
		return -1;
	e->family = dns->family;
	e->dport = DNS_PORT;
	__builtin_memcpy(e->addr, dns->addr, sizeof(e->addr));
	return 0;
}

static __always_inline void read_dns_payload(struct sockaddr_event *e, const void *buf, u64 len)
{
	if (e->dport != DNS_PORT || !buf)
		return;
	u32 n = len;
	if (len > PAYLOAD_MAX) {
		n = PAYLOAD_MAX;
		e->hdr.flags |= EVENT_F_PAYLOAD_TRUNCATED;
	}
	if (n == 0 || bpf_probe_read_user(e->payload, n & (2 * PAYLOAD_MAX - 1), buf) < 0)
		return;
	e->payload_len = n;
}

static __always_inline int sockaddr_exit(u16 kind, long ret)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct sockaddr_event *e = sockaddr_pending.lookup(&tid);
	if (!e) {
		return 0;
	}
	if (e->family == AF_UNIX_)
		kind = EVENT_UNIX_CONNECT;
	if (ret == -EPERM_ && !refusal_reportable(kind)) {  /* a refused one, past the budget */
		sockaddr_pending.delete(&tid);
		return 0;
	}
	u64 size = offsetof(struct sockaddr_event, payload) + e->payload_len;
	fill_header(&e->hdr, kind, size);
	e->retval = ret;
	if (kind == EVENT_CONNECT && (ret == 0 || ret == -EINPROGRESS_)) {
		struct socket_key key = {.tgid = e->hdr.pid, .fd = e->fd};
		if (e->dport == DNS_PORT) {
			struct dns_socket dns = {.family = e->family};
			__builtin_memcpy(dns.addr, e->addr, sizeof(dns.addr));
			dns_sockets.update(&key, &dns);
		} else if (dns_sockets.lookup(&key)) {
			dns_sockets.delete(&key);  /* the fd now leads elsewhere */
		}
	}
	submit(&e->hdr, size, sizeof(*e), WAKE_ALERT);
	sockaddr_pending.delete(&tid);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
	if (!in_scope())
		return 0;
	struct sockaddr_event *e = sockaddr_begin(args->fd);
	if (!e)
		return 0;
	if (read_sockaddr(e, args->uservaddr, args->addrlen) < 0 &&
	    read_unix_sockaddr(e, args->uservaddr, args->addrlen) < 0)
		sockaddr_abandon();
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
	return sockaddr_exit(EVENT_CONNECT, args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendto)
{
	if (!in_scope())
		return 0;
	struct sockaddr_event *e = sockaddr_begin(args->fd);
	if (!e)
		return 0;
	int found = args->addr ? read_sockaddr(e, args->addr, args->addr_len)
			       : use_connected_dns(e, args->fd);
	if (found < 0) {
		sockaddr_abandon();
		return 0;
	}
	e->length = args->len;
	read_dns_payload(e, args->buff, args->len);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_sendto)
{
	return sockaddr_exit(EVENT_UDP_SEND, args->ret);
}

/* A DNS message may come in pieces (header in one iovec, question in the next): the
 * head of the first IOV_GATHER iovecs, joined, is the payload. Read through a scratch
 * of twice PAYLOAD_MAX so the verifier can bound each piece's place. */
#define IOV_GATHER 4
struct iov_gather_buf {
	u8 bytes[2 * PAYLOAD_MAX];
};
BPF_PERCPU_ARRAY(iov_gather, struct iov_gather_buf, 1);

static __always_inline void read_iovecs(struct sockaddr_event *e, const struct user_iovec *uiov, u64 iovlen)
{
	u32 zero = 0;
	struct iov_gather_buf *gather = iov_gather.lookup(&zero);
	if (!gather || !uiov)
		return;
	u8 *buf = gather->bytes;
	u32 off = 0;
	u64 total = 0;
	int i;
	for (i = 0; i < IOV_GATHER; i++) {
		struct user_iovec iov = {};
		if (i >= iovlen || bpf_probe_read_user(&iov, sizeof(iov), &uiov[i]) < 0)
			break;
		total += iov.len;
		if (e->dport != DNS_PORT || !iov.base || off >= PAYLOAD_MAX)
			continue;
		/* off < PAYLOAD_MAX here, but the compiler drops a mask it can prove useless:
		 * the barrier keeps it for the verifier. A piece may run past PAYLOAD_MAX into
		 * the scratch's second half; only PAYLOAD_MAX bytes are kept. */
		off &= PAYLOAD_MAX - 1;
		asm volatile("" : "+r"(off));
		off &= PAYLOAD_MAX - 1;
		u32 n = iov.len > PAYLOAD_MAX ? PAYLOAD_MAX : (u32)iov.len;
		if (n && bpf_probe_read_user(buf + off, n, iov.base) == 0)
			off += n;
	}
	if (i == IOV_GATHER && iovlen > IOV_GATHER)
		total += 1;  /* more pieces than were read: at least this much more */
	e->length = total;
	if (off == 0)
		return;
	off &= 2 * PAYLOAD_MAX - 1;
	if (off > PAYLOAD_MAX)
		off = PAYLOAD_MAX;
	if (total > off)
		e->hdr.flags |= EVENT_F_PAYLOAD_TRUNCATED;
	if (bpf_probe_read_kernel(e->payload, PAYLOAD_MAX, buf) == 0)
		e->payload_len = off;
}

/* user-space struct mmsghdr: a msghdr (56 bytes), then msg_len, padded */
#define MMSGHDR_SIZE 64
/* messages of one sendmmsg read: glibc's resolver sends A and AAAA questions together, and a
 * question hidden behind an innocent first message is still a question */
#define MMSG_MAX 8
BPF_PERCPU_ARRAY(mmsg_scratch, struct sockaddr_event, 1);

/* sendmsg, and the first message of sendmmsg (whose mmsghdr starts with a msghdr). */
static __always_inline int sendmsg_enter(int fd, const void *umsg)
{
	if (!in_scope())
		return 0;
	struct user_msghdr_head msg = {};
	if (!umsg || bpf_probe_read_user(&msg, sizeof(msg), umsg) < 0)
		return 0;
	struct sockaddr_event *e = sockaddr_begin(fd);
	if (!e)
		return 0;
	int found = msg.name ? read_sockaddr(e, msg.name, msg.namelen) : use_connected_dns(e, fd);
	if (found < 0) {
		sockaddr_abandon();
		return 0;
	}
	read_iovecs(e, msg.iov, msg.iovlen);
	return 0;
}

/* The DNS questions among sendmmsg's messages after the first, each its own event, sent at
 * the call (their own results are not known one by one: retval 0). */
static __always_inline void later_dns_messages(int fd, const u8 *mmsg, u32 vlen)
{
	u32 zero = 0;
	struct sockaddr_event *e = mmsg_scratch.lookup(&zero);
	if (!e || !mmsg)
		return;
	for (int i = 1; i < MMSG_MAX; i++) {
		if (i >= vlen)
			break;
		struct user_msghdr_head msg = {};
		if (bpf_probe_read_user(&msg, sizeof(msg), mmsg + i * MMSGHDR_SIZE) < 0)
			break;
		e->hdr.flags = 0;
		e->fd = fd;
		e->length = 0;
		e->payload_len = 0;
		e->sock_type = 0;
		e->protocol = 0;
		__builtin_memset(e->addr, 0, sizeof(e->addr));
		int found = msg.name ? read_sockaddr(e, msg.name, msg.namelen) : use_connected_dns(e, fd);
		if (found < 0 || e->dport != DNS_PORT)
			continue;
		read_iovecs(e, msg.iov, msg.iovlen);
		u64 size = offsetof(struct sockaddr_event, payload) + (e->payload_len & (2 * PAYLOAD_MAX - 1));
		fill_header(&e->hdr, EVENT_UDP_SEND, size);
		e->retval = 0;
		submit(&e->hdr, size, sizeof(*e), WAKE_ALERT);
	}
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg)
{
	return sendmsg_enter(args->fd, args->msg);
}

TRACEPOINT_PROBE(syscalls, sys_exit_sendmsg)
{
	return sockaddr_exit(EVENT_UDP_SEND, args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendmmsg)
{
	sendmsg_enter(args->fd, args->mmsg);
	if (in_scope())
		later_dns_messages(args->fd, (const u8 *)args->mmsg, args->vlen);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_sendmmsg)
{
	return sockaddr_exit(EVENT_UDP_SEND, args->ret);
}
