/* Structs and limits shared between the probes and user space.
 *
 * ebpfmon/kernel/abi.py mirrors this file with ctypes; tests/kernel/test_abi.py
 * compiles static asserts generated from that mirror against this header, so a
 * change here that is not made there fails the tests.
 */
#ifndef EBPFMON_EVENTS_H
#define EBPFMON_EVENTS_H

/* Event kinds. Numbers are part of the recorded-trace contract: append only. */
enum event_kind {
	EVENT_EXEC = 1,        /* execve/execveat completed (or failed) */
	EVENT_CONNECT = 2,     /* connect() to an IPv4/IPv6 address */
	EVENT_UDP_SEND = 3,    /* sendto/sendmsg carrying a destination address */
	EVENT_GPU_OPEN = 4,    /* open/openat/openat2 of a path under a GPU prefix */
	EVENT_FORK = 5,        /* new task (sched_process_fork) */
	EVENT_EXIT = 6,        /* task exit (sched_process_exit) */
	EVENT_CGROUP_MKDIR = 7,/* cgroup created (v2 hierarchy) */
	EVENT_CGROUP_RMDIR = 8,/* cgroup removed (v2 hierarchy) */
	EVENT_REFUSED = 9,     /* enforcement refused a connect, a send or a device */
	EVENT_DEVICE = 10,     /* a GPU device access seen by the cgroup device hook only */
	EVENT_UNIX_CONNECT = 11, /* connect() to a Unix socket: a sockaddr_event, the path in payload */
	EVENT_KIND_MAX = 12,
};

/* Per-kind counters, indexed kind * COUNTER_MAX + counter. */
enum counter {
	COUNTER_LOST = 0,      /* ring buffer full, or entry state evicted */
	COUNTER_TRUNCATED = 1, /* event sent with a truncated field */
	COUNTER_THROTTLED = 2, /* a refusal past its cgroup's budget: counted, not sent */
	COUNTER_MAX = 3,
};

/* header.flags */
#define EVENT_F_ARGV_TRUNCATED     (1 << 0) /* more arguments than EXEC_MAX_ARGS or buffer full */
#define EVENT_F_ARG_TRUNCATED      (1 << 1) /* an argument longer than EXEC_ARG_MAX */
#define EVENT_F_PATH_TRUNCATED     (1 << 2) /* filename/path longer than PATH_MAX_CAPTURE - 1 */
#define EVENT_F_ARGV_UNREADABLE    (1 << 3) /* user memory of argv could not be read */
#define EVENT_F_PAYLOAD_TRUNCATED  (1 << 4) /* datagram longer than PAYLOAD_MAX */
#define EVENT_F_FROM_HOOK          (1 << 5) /* seen by a cgroup hook, not a syscall (io_uring...): no result */

#define COMM_LEN 16
#define PATH_MAX_CAPTURE 256        /* filename/path bytes kept, NUL included */
#define EXEC_MAX_ARGS 64            /* argv entries read at most */
#define EXEC_ARG_MAX 256            /* bytes of one argument kept, NUL excluded */
#define EXEC_ARGS_SIZE 8192         /* packed argv buffer: >= 31 full-length args */
#define PAYLOAD_MAX 256             /* head of a DNS datagram kept (port 53 only) */
#define GPU_PREFIX_MAX 64           /* bytes of one GPU path prefix, NUL included */
#define GPU_PREFIXES_MAX 16         /* GPU path prefixes configurable */
#define SCOPE_MAX_DEPTH 16          /* cgroup ancestors checked for scope */

/* Every event starts with this header. */
struct event_header {
	__u16 kind;                 /* enum event_kind */
	__u16 flags;                /* EVENT_F_* */
	__u32 size;                 /* bytes in the whole record */
	__u64 time_ns;              /* CLOCK_BOOTTIME */
	__u64 cgroup_id;            /* v2 cgroup of the task */
	__u32 pid;                  /* tgid */
	__u32 tid;
	__u32 ppid;                 /* parent tgid at fork; 0 if forked before the monitor */
	__u32 _reserved;
	__u32 uid;
	__u32 gid;
	char comm[COMM_LEN];
};

/* Sent with only the used part of args[]: size = offsetof(args) + args_size. */
struct exec_event {
	struct event_header hdr;
	__s32 retval;               /* 0 or -errno */
	__u32 argc;                 /* arguments captured */
	__u32 args_size;            /* bytes used in args[] */
	__u32 syscall;              /* 0 execve, 1 execveat */
	__s32 dfd;                  /* execveat only */
	__u32 at_flags;             /* execveat only */
	char filename[PATH_MAX_CAPTURE];
	char args[EXEC_ARGS_SIZE];  /* NUL-terminated arguments, back to back */
};

/* connect() and addressed datagrams: both carry a socket address. */
struct sockaddr_event {
	struct event_header hdr;
	__s32 retval;               /* connect: 0/-errno; send: bytes sent or -errno */
	__s32 fd;
	__u16 family;               /* AF_INET, AF_INET6; AF_UNIX (connect only) */
	__u16 dport;                /* host byte order */
	__u16 sock_type;            /* SOCK_STREAM/SOCK_DGRAM...; 0 when unknown */
	__u16 protocol;             /* as given to socket(); 0 when default/unknown */
	__u8 addr[16];              /* IPv4 in the first 4 bytes */
	__u32 length;               /* send: bytes asked to send */
	__u32 payload_len;          /* bytes in payload[] */
	__u8 payload[PAYLOAD_MAX];  /* head of a datagram to port 53; a Unix socket's path */
};

struct gpu_open_event {
	struct event_header hdr;
	__s32 retval;               /* fd or -errno */
	__s32 dfd;
	__u32 flags;                /* open flags (O_*) */
	__u32 syscall;              /* 0 open, 1 openat, 2 openat2 */
	char path[PATH_MAX_CAPTURE];
};

struct fork_event {
	struct event_header hdr;    /* hdr.pid: parent tgid */
	__u32 child_pid;            /* tid of the new task */
	__u32 parent_pid;           /* as reported by the tracepoint (parent tid) */
};

struct exit_event {
	struct event_header hdr;    /* hdr.pid/tid: the exiting task */
};

struct cgroup_event {
	struct event_header hdr;
	__u64 id;
	__s32 level;
	__u32 _pad;
	char path[PATH_MAX_CAPTURE];
};

/* Why enforcement refused (refused_event.reason). */
enum refuse_reason {
	REFUSE_CUT = 1,        /* the agent's network is cut */
	REFUSE_PORT = 2,       /* destination port on the deny list */
	REFUSE_NET = 3,        /* destination address in a denied network */
	REFUSE_GPU = 4,        /* GPU device the agent is not entitled to */
	REFUSE_EGRESS = 5,     /* destination not allowed by the agent's egress profile */
	REFUSE_REASON_MAX = 6,
};

/* What was refused (refused_event.op). */
enum refuse_op {
	OP_CONNECT = 1,
	OP_SENDMSG = 2,
	OP_DEVICE = 3,
};

struct refused_event {
	struct event_header hdr;
	__u64 agent_id;             /* the agent's cgroup (ancestor at the agent level) */
	__u32 reason;               /* enum refuse_reason */
	__u32 op;                   /* enum refuse_op */
	__u32 dry_run;              /* 1: only reported, let through */
	__u16 family;
	__u16 dport;
	__u16 sock_type;
	__u16 protocol;
	__u8 addr[16];
	__u32 major;                /* devices */
	__u32 minor;
	__u32 access;               /* BPF_DEVCG_ACC_* */
	__u32 profile;              /* egress: the profile that refused (its id), else 0 */
};

struct device_event {
	struct event_header hdr;
	__u64 agent_id;
	__u32 major;
	__u32 minor;
	__u32 access;               /* BPF_DEVCG_ACC_MKNOD 1, READ 2, WRITE 4 */
	__u32 _pad;
};

/* Written by the loader for the enforcement programs. */
struct enforce_config {
	__u32 agent_level;          /* absolute cgroup level of agent cgroups */
	__u32 dry_run;              /* report refusals, enforce none */
	__u32 gpu_default_deny;     /* agents without a gpu_policy entry are refused GPUs */
	__u32 dns_proxy_port;       /* the daemon's DNS proxy on loopback; 0: none, DNS is judged like the rest */
};

/* GPUs. gpu_majors: major -> enum gpu_major, how its minors are judged when
 * gpu_nodes (major << 32 | minor -> struct gpu_node) has no entry for the number. */
enum gpu_major {
	GPU_MAJOR_NVIDIA = 1,       /* nvidiaN is GPU N; 254 and 255 (modeset, ctl) are control nodes */
	GPU_MAJOR_SHARED = 2,       /* every minor is a control node (nvidia-uvm, kfd) */
	GPU_MAJOR_DRM = 3,          /* cardN, controlD(64+N), renderD(128+N): GPU N */
	GPU_MAJOR_INDEXED = 4,      /* minor N is accelerator N (accel) */
	GPU_MAJOR_ADMIN = 5,        /* the driver's administration (MIG config, NVSwitch, IMEX) */
};

enum gpu_node_class {
	GPU_NODE_GPU = 1,           /* one GPU's node: its grant, or a MIG instance's on it */
	GPU_NODE_SHARED = 2,        /* a control node: every agent granted any GPU */
	GPU_NODE_MIG = 3,           /* a MIG capability: its GPU granted whole, or a gpu_mig_grants entry */
	GPU_NODE_ADMIN = 4,         /* only an agent granted every GPU */
};

#define GPU_INDEX_MAX 64        /* GPUs by index in the 64-bit masks */

struct gpu_node {
	__u32 node_class;           /* enum gpu_node_class */
	__u32 gpu;                  /* its GPU's index (GPU and MIG nodes) */
};

/* gpu_policy value: per agent cgroup; agents without one get gpu_default_deny. */
struct gpu_policy {
	__u32 allow;                /* 0: no GPU node at all */
	__u32 every_gpu;            /* 1: every node, administration included */
	__u64 gpu_mask;             /* else: the GPUs (bit = index) granted whole */
	__u64 mig_mask;             /* the GPUs a MIG instance of is granted (their GPU node, not their caps) */
};

/* gpu_mig_grants key: one MIG capability node an agent may open. */
struct gpu_mig_key {
	__u64 agent_id;
	__u32 major;
	__u32 minor;
};

struct lpm_v4 {
	__u32 prefixlen;
	__u8 addr[4];
};

/* Egress profiles. A policy is written whole into the generation that is not
 * active, then egress_state.active flips to it: a connect is judged by one
 * policy or the other, never a mix. Keys carry the scope, generation << 16 |
 * profile id (1..), so both generations live in the same maps. */
enum egress_mode {
	EGRESS_OFF = 0,
	EGRESS_AUDIT = 1,           /* allowed, reported as would-refuse */
	EGRESS_ENFORCE = 2,
};

#define EGRESS_RANGES 8         /* port ranges one allow entry holds */
#define EGRESS_UNCLASSIFIED 0xffff  /* the profile id of agents refused until classified */

/* A profile as an agent meets it: which, and its mode (enum egress_mode). */
struct egress_class {
	__u32 profile;              /* 0: none */
	__u32 mode;
};

struct egress_generation {
	struct egress_class fallback; /* agents no glob names: the default profile */
	__u32 classified_only;      /* 1: an agent without an egress_agents entry is refused until the
				     * daemon has classified it (a glob may name it) */
	__u32 _pad;
};

struct egress_state {
	__u32 active;               /* the generation in force: 0 or 1 */
	__u32 _pad;
	struct egress_generation generation[2];
};

/* egress_agents: an agent's egress_class, as the daemon classified it */
struct egress_agent_key {
	__u64 agent;                /* agent cgroup id */
	__u32 generation;
	__u32 _pad;
};

struct egress_range {
	__u16 lo;
	__u16 hi;
	__u8 proto;                 /* IPPROTO_TCP, IPPROTO_UDP; 0 both */
	__u8 from_name;             /* 1: allowed by a DNS name the agent resolved, until expires_ns */
	__u8 _pad[2];
};

/* What the longest allow prefix of a destination permits: the port ranges of
 * every entry containing it (the loader folds shorter prefixes into longer). */
struct egress_allow {
	__u64 expires_ns;           /* bpf_ktime_get_ns() after which its from_name ranges allow nothing */
	__u32 count;                /* ranges used */
	__u32 _pad;
	struct egress_range range[EGRESS_RANGES];
};

struct egress_v4 {
	__u32 prefixlen;            /* 32 (scope) + the CIDR's length */
	__u32 scope;
	__u8 addr[4];
};

struct egress_v6 {
	__u32 prefixlen;
	__u32 scope;
	__u8 addr[16];
};

struct lpm_v6 {
	__u32 prefixlen;
	__u8 addr[16];
};

/* A socket of an agent whose DNS (port 53, UDP or TCP) goes to the daemon's DNS proxy: who
 * asked, and the server asked (dns_redirects, by socket cookie; dns_clients, by the source
 * port the proxy sees). */
struct dns_client {
	__u64 agent_id;
	__u64 cgroup_id;
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__u32 gid;
	__u16 family;               /* AF_INET or AF_INET6: of the address the agent gave */
	__u16 port;                 /* the server's port, host order */
	__u8 addr[16];              /* the server's address as the agent gave it (IPv4: 4 bytes) */
	char comm[COMM_LEN];
};

struct dns_client_key {
	__u8 ip_version;            /* 4 or 6: of the packets the proxy receives */
	__u8 protocol;              /* IPPROTO_UDP, IPPROTO_TCP */
	__u16 port;                 /* the agent socket's source port, host order */
};

/* Written by the loader, read by every probe. */
struct probe_config {
	__u32 all_cgroups;          /* 1: ignore scope, trace everything */
	__u32 ignore_tgid;          /* the monitor itself, never traced */
	__u32 scope_generation;     /* bumped at every change of scope: drops cached verdicts */
};

struct gpu_prefix {
	__u32 len;                  /* bytes to compare, NUL excluded; 0 ends the list */
	char prefix[GPU_PREFIX_MAX];
};

#endif
