/* enforce: cgroup programs attached at the agent root, so they run only for
 * agents. They cut an agent's network (skb ingress/egress drop, connect and
 * sendmsg refused), refuse destinations on the deny lists, and refuse GPU
 * devices by major:minor whatever the path. Every refusal is an event; so is
 * every connect and GPU access these hooks see that the syscall probes did
 * not (io_uring, relative paths), so observation is never weaker than
 * enforcement.
 *
 * State that must outlive the daemon is in maps pinned under PIN_DIR (set by
 * the loader with -D): the programs stay attached when the daemon dies, and a
 * restarted daemon loads the same maps and replaces the programs.
 */
#ifndef PIN_DIR
#error "PIN_DIR must be defined by the loader"
#endif

#define BPF_DEVCG_DEV_CHAR_ 2

BPF_ARRAY(enforce_config, struct enforce_config, 1);
BPF_TABLE_PINNED("hash", u64, u64, cut_cgroups, 4096, PIN_DIR "/cut_cgroups");
BPF_TABLE_PINNED("hash", u16, u8, deny_ports, 1024, PIN_DIR "/deny_ports");
BPF_TABLE_PINNED7("lpm_trie", struct lpm_v4, u8, deny_nets4, 4096, PIN_DIR "/deny_nets4", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED7("lpm_trie", struct lpm_v6, u8, deny_nets6, 4096, PIN_DIR "/deny_nets6", BPF_F_NO_PREALLOC);
/* GPU grants per agent; the pins are named after their layout (an older gpu_policy pin is not read) */
BPF_TABLE_PINNED("hash", u64, struct gpu_policy, gpu_grants, 65536, PIN_DIR "/gpu_grants");
BPF_TABLE_PINNED("hash", struct gpu_mig_key, u8, gpu_mig_grants, 65536, PIN_DIR "/gpu_mig_grants");
/* egress profiles, two generations (probes/events.h) */
BPF_TABLE_PINNED("array", u32, struct egress_state, egress_state, 1, PIN_DIR "/egress_state");
BPF_TABLE_PINNED("hash", struct egress_agent_key, struct egress_class, egress_agents, 65536,
		 PIN_DIR "/egress_agents");
BPF_TABLE_PINNED7("lpm_trie", struct egress_v4, struct egress_allow, egress_allow4, 262144, PIN_DIR "/egress_allow4",
		  BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED7("lpm_trie", struct egress_v6, struct egress_allow, egress_allow6, 262144, PIN_DIR "/egress_allow6",
		  BPF_F_NO_PREALLOC);
/* DNS redirected to the daemon's proxy: by socket cookie, and by the source port the proxy sees */
BPF_TABLE("lru_hash", u64, struct dns_client, dns_redirects, 16384);
BPF_TABLE("lru_hash", struct dns_client_key, struct dns_client, dns_clients, 16384);
/* what a cut leaves open (default: nothing) */
BPF_LPM_TRIE(cut_allow4, struct lpm_v4, u8, 256);
BPF_LPM_TRIE(cut_allow6, struct lpm_v6, u8, 256);
BPF_HASH(gpu_majors, u32, u32, 64);
BPF_HASH(gpu_nodes, u64, struct gpu_node, 16384);
/* refusals by reason, packets dropped by cuts */
BPF_PERCPU_ARRAY(enforce_counters, u64, REFUSE_REASON_MAX + 1);
#define COUNTER_SKB_DROPPED REFUSE_REASON_MAX

static __always_inline struct enforce_config *econfig(void)
{
	u32 zero = 0;
	return enforce_config.lookup(&zero);
}

static __always_inline void count_refusal(u32 index)
{
	u64 *value = enforce_counters.lookup(&index);
	if (value)
		(*value)++;
}

static __always_inline int is_cut(u64 agent)
{
	return agent && cut_cgroups.lookup(&agent) != NULL;
}

/* Whether an address lies in the networks a cut leaves open (ALLOWED) or in
 * the denied ones (DENIED). One function per family choosing the trie: bcc
 * turns `map.lookup(` into a map reference only where the map is named, not
 * through pointers or macros. */
#define ALLOWED 0
#define DENIED 1

static __always_inline int v4_in(int which, u8 *addr)
{
	struct lpm_v4 key = {.prefixlen = 32};
	__builtin_memcpy(key.addr, addr, 4);
	if (which == ALLOWED)
		return cut_allow4.lookup(&key) != NULL;
	return deny_nets4.lookup(&key) != NULL;
}

static __always_inline int v6_in(int which, u8 *addr)
{
	struct lpm_v6 key = {.prefixlen = 128};
	__builtin_memcpy(key.addr, addr, 16);
	if (which == ALLOWED)
		return cut_allow6.lookup(&key) != NULL;
	return deny_nets6.lookup(&key) != NULL;
}

static __always_inline int is_v6_loopback(u8 *addr)
{
	u32 words[4];
	__builtin_memcpy(words, addr, 16);
	return words[0] == 0 && words[1] == 0 && words[2] == 0 && words[3] == bpf_htonl(1);
}

/* ---- network: cut ---- */

/* The first packets of a socket redirected to the DNS proxy say which source port the proxy
 * will see it from: the connect and sendmsg hooks run before the port is chosen. */
static __always_inline void note_dns_client(struct __sk_buff *skb, u32 proxy_port)
{
	u64 cookie = bpf_get_socket_cookie(skb);
	struct dns_client *client = dns_redirects.lookup(&cookie);
	if (!client)
		return;
	struct dns_client_key key = {};
	u16 ports[2];
	if (skb->protocol == bpf_htons(0x0800)) {
		u8 ip[20];
		if (bpf_skb_load_bytes(skb, 0, ip, sizeof(ip)) < 0 ||
		    bpf_skb_load_bytes(skb, (ip[0] & 0xf) * 4, ports, sizeof(ports)) < 0)
			return;
		key.ip_version = 4;
		key.protocol = ip[9];
	} else if (skb->protocol == bpf_htons(0x86DD)) {
		u8 ip6[40];
		/* the next header right after the fixed header: loopback DNS has no extension headers */
		if (bpf_skb_load_bytes(skb, 0, ip6, sizeof(ip6)) < 0 ||
		    bpf_skb_load_bytes(skb, sizeof(ip6), ports, sizeof(ports)) < 0)
			return;
		key.ip_version = 6;
		key.protocol = ip6[6];
	} else {
		return;
	}
	if (bpf_ntohs(ports[1]) != proxy_port)
		return;
	key.port = bpf_ntohs(ports[0]);
	dns_clients.update(&key, client);
}

/* 1 keeps the packet. In cgroup_skb programs the data starts at the IP header. */
static __always_inline int skb_verdict(struct __sk_buff *skb, int egress)
{
	struct enforce_config *cfg = econfig();
	if (!cfg)
		return 1;
	if (egress && cfg->dns_proxy_port)
		note_dns_client(skb, cfg->dns_proxy_port);
	u64 agent = bpf_skb_ancestor_cgroup_id(skb, cfg->agent_level);
	if (!is_cut(agent))
		return 1;
	if (skb->protocol == bpf_htons(0x0800)) {
		u8 ip[20];
		if (bpf_skb_load_bytes(skb, 0, ip, sizeof(ip)) == 0 &&
		    v4_in(ALLOWED, egress ? &ip[16] : &ip[12]))
			return 1;
	} else if (skb->protocol == bpf_htons(0x86DD)) {
		u8 ip6[40];
		if (bpf_skb_load_bytes(skb, 0, ip6, sizeof(ip6)) == 0 &&
		    v6_in(ALLOWED, egress ? &ip6[24] : &ip6[8]))
			return 1;
	}
	if (cfg->dry_run)
		return 1;
	count_refusal(COUNTER_SKB_DROPPED);
	return 0;
}

int enforce_egress(struct __sk_buff *skb)
{
	return skb_verdict(skb, 1);
}

int enforce_ingress(struct __sk_buff *skb)
{
	return skb_verdict(skb, 0);
}

/* ---- network: connect and sendmsg ---- */

static __always_inline void refused(u64 agent, u32 reason, u32 op, u32 dry_run, u32 profile,
				    struct bpf_sock_addr *ctx, u8 *addr, u32 addr_len)
{
	count_refusal(reason);
	if (!refusal_reportable(EVENT_REFUSED))
		return;
	struct refused_event e = {};
	fill_header(&e.hdr, EVENT_REFUSED, sizeof(e));
	e.agent_id = agent;
	e.reason = reason;
	e.op = op;
	e.dry_run = dry_run;
	e.profile = profile;
	if (ctx) {
		e.family = ctx->user_family;
		e.dport = bpf_ntohs(ctx->user_port);
		e.sock_type = ctx->type;
		e.protocol = ctx->protocol;
		if (addr_len == 4)
			__builtin_memcpy(e.addr, addr, 4);
		else if (addr_len == 16)
			__builtin_memcpy(e.addr, addr, 16);
	}
	submit(&e.hdr, sizeof(e), sizeof(e), WAKE_ALERT);
}

/* The connect or send the syscall probe is building (a pending entry for this
 * thread) gets the socket type and protocol, which only this hook can read
 * without kernel structs. A connect the tracepoint did not see (io_uring, for
 * one) is reported from here, without a result, when it goes through: a
 * refused one is a refused event, not a connect (rules would take it for a
 * connection made). */
static __always_inline void sockaddr_seen(struct bpf_sock_addr *ctx, u32 op, int allowed, u8 *addr,
					  u32 addr_len)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct sockaddr_event *pending = sockaddr_pending.lookup(&tid);
	if (pending) {
		pending->sock_type = ctx->type;
		pending->protocol = ctx->protocol;
		return;
	}
	if (op != OP_CONNECT || !allowed)
		return;
	u32 zero = 0;
	struct sockaddr_event *e = sockaddr_scratch.lookup(&zero);
	if (!e)
		return;
	fill_header(&e->hdr, EVENT_CONNECT, offsetof(struct sockaddr_event, payload));
	e->hdr.flags = EVENT_F_FROM_HOOK;
	e->retval = 0;
	e->fd = -1;
	e->family = ctx->user_family;
	e->dport = bpf_ntohs(ctx->user_port);
	e->sock_type = ctx->type;
	e->protocol = ctx->protocol;
	e->length = 0;
	e->payload_len = 0;
	__builtin_memset(e->addr, 0, sizeof(e->addr));
	if (addr_len == 4)
		__builtin_memcpy(e->addr, addr, 4);
	else if (addr_len == 16)
		__builtin_memcpy(e->addr, addr, 16);
	submit(&e->hdr, offsetof(struct sockaddr_event, payload), sizeof(*e), WAKE_ALERT);
}

/* ---- network: egress profiles ---- */

/* The scope (generation << 16 | profile id) of the agent's profile, and its
 * mode; 0 when no profile applies or the profile is off. An agent the daemon
 * has not classified yet, where a glob could name it, gets EGRESS_UNCLASSIFIED:
 * refused until it is (fail closed: its profile may allow less than others). */
static __always_inline u32 egress_scope(u64 agent, u32 *mode)
{
	u32 zero = 0;
	struct egress_state *state = egress_state.lookup(&zero);
	if (!state || !agent)
		return 0;
	u32 generation = state->active & 1;
	struct egress_generation *g = &state->generation[generation];
	struct egress_agent_key key = {.agent = agent, .generation = generation};
	struct egress_class *named = egress_agents.lookup(&key);
	if (!named && g->classified_only) {
		*mode = EGRESS_ENFORCE;
		return generation << 16 | EGRESS_UNCLASSIFIED;
	}
	struct egress_class *class = named ? named : &g->fallback;
	if (!class->profile || class->mode == EGRESS_OFF)
		return 0;
	*mode = class->mode;
	return generation << 16 | (class->profile & 0xffff);
}

static __always_inline int egress_permits(struct egress_allow *allow, u16 port, u8 proto)
{
	if (!allow)
		return 0;
	int expired = -1;  /* the clock only for names' ranges: reading it costs more than the lookup here */
	for (int i = 0; i < EGRESS_RANGES; i++) {
		if (i >= allow->count)
			break;
		struct egress_range *r = &allow->range[i];
		if (r->from_name) {
			if (expired < 0)
				expired = allow->expires_ns < bpf_ktime_get_ns();
			if (expired)
				continue;
		}
		if (port >= r->lo && port <= r->hi && (!r->proto || r->proto == proto))
			return 1;
	}
	return 0;
}

/* One function per family, naming its trie (bcc rewrites map.lookup( only there). */
static __always_inline int egress_v4_allows(u32 scope, u8 *addr, u16 port, u8 proto)
{
	struct egress_v4 key = {.prefixlen = 64, .scope = scope};
	__builtin_memcpy(key.addr, addr, 4);
	return egress_permits(egress_allow4.lookup(&key), port, proto);
}

static __always_inline int egress_v6_allows(u32 scope, u8 *addr, u16 port, u8 proto)
{
	struct egress_v6 key = {.prefixlen = 160, .scope = scope};
	__builtin_memcpy(key.addr, addr, 16);
	return egress_permits(egress_allow6.lookup(&key), port, proto);
}

/* ---- network: DNS through the daemon's proxy ---- */

#define LOOPBACK4 0x7f000001

/* An agent with a profile asks the daemon's proxy, whatever server it named: the proxy answers
 * only for names the profile allows, and allows their addresses before the agent has them.
 * The server asked is kept for the replies (recvmsg, getpeername: as if it had answered). */
static __always_inline void redirect_dns(struct bpf_sock_addr *ctx, struct enforce_config *cfg, u64 agent,
					 u8 *addr, u32 addr_len, int mapped)
{
	u64 cookie = bpf_get_socket_cookie(ctx);
	u64 pid_tgid = bpf_get_current_pid_tgid();
	u64 uid_gid = bpf_get_current_uid_gid();
	struct dns_client client = {
		.agent_id = agent,
		.cgroup_id = bpf_get_current_cgroup_id(),
		.pid = pid_tgid >> 32,
		.tid = (u32)pid_tgid,
		.uid = (u32)uid_gid,
		.gid = uid_gid >> 32,
		.family = ctx->user_family,
		.port = bpf_ntohs(ctx->user_port),
	};
	bpf_get_current_comm(client.comm, sizeof(client.comm));
	if (addr_len == 16)
		__builtin_memcpy(client.addr, addr, 16);
	else
		__builtin_memcpy(client.addr, addr, 4);
	dns_redirects.update(&cookie, &client);
	if (addr_len == 4) {
		ctx->user_ip4 = bpf_htonl(LOOPBACK4);
	} else if (mapped) {  /* ::ffff:127.0.0.1: a dual-stack socket stays IPv4 */
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
		ctx->user_ip6[3] = bpf_htonl(LOOPBACK4);
	} else {  /* ::1 */
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	}
	ctx->user_port = bpf_htons(cfg->dns_proxy_port);
}

/* What the agent reads as the peer of a reply (recvmsg) or of its socket (getpeername): the
 * server it asked, where the proxy answered. Always 1: these hooks cannot refuse. */
static __always_inline int restore_dns_peer(struct bpf_sock_addr *ctx, int v6)
{
	struct enforce_config *cfg = econfig();
	if (!cfg || !cfg->dns_proxy_port || ctx->user_port != bpf_htons(cfg->dns_proxy_port))
		return 1;
	u64 cookie = bpf_get_socket_cookie(ctx);
	struct dns_client *client = dns_redirects.lookup(&cookie);
	if (!client)
		return 1;
	if (!v6) {
		if (ctx->user_ip4 != bpf_htonl(LOOPBACK4) || client->family != 2 /* AF_INET */)
			return 1;
		u32 ip4;
		__builtin_memcpy(&ip4, client->addr, 4);
		ctx->user_ip4 = ip4;
	} else {
		u32 w3 = ctx->user_ip6[3];
		int proxy = ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 &&
			    ((ctx->user_ip6[2] == 0 && w3 == bpf_htonl(1)) ||
			     (ctx->user_ip6[2] == bpf_htonl(0x0000ffff) && w3 == bpf_htonl(LOOPBACK4)));
		if (!proxy || client->family != 10 /* AF_INET6 */)
			return 1;
		u32 words[4];
		__builtin_memcpy(words, client->addr, 16);
		ctx->user_ip6[0] = words[0];
		ctx->user_ip6[1] = words[1];
		ctx->user_ip6[2] = words[2];
		ctx->user_ip6[3] = words[3];
	}
	ctx->user_port = bpf_htons(client->port);
	return 1;
}

/* 1 lets the connect/sendmsg go on; 0 fails it with EPERM before any packet. */
static __always_inline int addr_verdict(struct bpf_sock_addr *ctx, u32 op, int v6)
{
	struct enforce_config *cfg = econfig();
	if (!cfg)
		return 1;
	u64 agent = bpf_get_current_ancestor_cgroup_id(cfg->agent_level);
	u8 addr[16] = {};
	u32 addr_len = 4;
	u8 *v4 = addr;
	if (v6) {
		/* context fields must be read with 4-byte loads */
		u32 words[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};
		addr_len = 16;
		__builtin_memcpy(addr, words, 16);
		/* IPv4-mapped (::ffff:a.b.c.d): judge the IPv4 address */
		int mapped = words[0] == 0 && words[1] == 0 && words[2] == bpf_htonl(0x0000ffff);
		v4 = mapped ? &addr[12] : NULL;
	} else {
		u32 ip4 = ctx->user_ip4;
		__builtin_memcpy(addr, &ip4, 4);
	}
	u32 reason = 0;
	u16 port = bpf_ntohs(ctx->user_port);
	/* what a cut leaves open (enforce.keep_open: nothing by default, so a cut agent
	 * reaches no local service either) is not subject to the deny lists; nor is
	 * loopback: a local dev server on a "pool port" is not a pool */
	int loopback = v4 ? v4[0] == 127 : is_v6_loopback(addr);
	if (!(v4 ? v4_in(ALLOWED, v4) : v6_in(ALLOWED, addr))) {
		if (is_cut(agent))
			reason = REFUSE_CUT;
		else if (!loopback && deny_ports.lookup(&port))
			reason = REFUSE_PORT;
		else if (!loopback && (v4 ? v4_in(DENIED, v4) : v6_in(DENIED, addr)))
			reason = REFUSE_NET;
	}
	/* an egress profile allows what it lists and nothing else: loopback included */
	u32 mode = EGRESS_OFF;
	u32 scope = reason ? 0 : egress_scope(agent, &mode);
	u8 protocol = ctx->protocol;
	if (scope && port == 53 && cfg->dns_proxy_port && (scope & 0xffff) != EGRESS_UNCLASSIFIED &&
	    (protocol == 17 /* UDP */ || protocol == 6 /* TCP */)) {
		sockaddr_seen(ctx, op, 1, addr, addr_len);
		redirect_dns(ctx, cfg, agent, addr, addr_len, v6 && v4 != NULL);
		return 1;
	}
	if (scope && !(v4 ? egress_v4_allows(scope, v4, port, ctx->protocol)
			  : egress_v6_allows(scope, addr, port, ctx->protocol)))
		reason = REFUSE_EGRESS;
	u32 dry_run = cfg->dry_run || (reason == REFUSE_EGRESS && mode == EGRESS_AUDIT);
	int allowed = !reason || dry_run;
	sockaddr_seen(ctx, op, allowed, addr, addr_len);
	if (reason)
		refused(agent, reason, op, dry_run, scope & 0xffff, ctx, addr, addr_len);
	return allowed;
}

int enforce_connect4(struct bpf_sock_addr *ctx)
{
	return addr_verdict(ctx, OP_CONNECT, 0);
}

int enforce_connect6(struct bpf_sock_addr *ctx)
{
	return addr_verdict(ctx, OP_CONNECT, 1);
}

int enforce_sendmsg4(struct bpf_sock_addr *ctx)
{
	return addr_verdict(ctx, OP_SENDMSG, 0);
}

int enforce_sendmsg6(struct bpf_sock_addr *ctx)
{
	return addr_verdict(ctx, OP_SENDMSG, 1);
}

int enforce_recvmsg4(struct bpf_sock_addr *ctx)
{
	return restore_dns_peer(ctx, 0);
}

int enforce_recvmsg6(struct bpf_sock_addr *ctx)
{
	return restore_dns_peer(ctx, 1);
}

int enforce_getpeername4(struct bpf_sock_addr *ctx)
{
	return restore_dns_peer(ctx, 0);
}

int enforce_getpeername6(struct bpf_sock_addr *ctx)
{
	return restore_dns_peer(ctx, 1);
}

/* ---- GPU devices ---- */

/* What a device number is: the model's entry (user space read /dev, sysfs and the driver's
 * MIG minors), else its major's rule. */
static __always_inline struct gpu_node gpu_node_of(u32 kind, u32 major, u32 minor)
{
	u64 number = (u64)major << 32 | minor;
	struct gpu_node *known = gpu_nodes.lookup(&number);
	if (known)
		return *known;
	struct gpu_node node = {.node_class = GPU_NODE_ADMIN};
	if (kind == GPU_MAJOR_NVIDIA) {
		node.node_class = minor >= 254 ? GPU_NODE_SHARED : GPU_NODE_GPU;
		node.gpu = minor;
	} else if (kind == GPU_MAJOR_SHARED) {
		node.node_class = GPU_NODE_SHARED;
	} else if (kind == GPU_MAJOR_DRM) {
		node.node_class = GPU_NODE_GPU;
		node.gpu = minor % 64;
	} else if (kind == GPU_MAJOR_INDEXED) {
		node.node_class = GPU_NODE_GPU;
		node.gpu = minor;
	}
	return node;
}

static __always_inline int gpu_bit(u64 mask, u32 gpu)
{
	return gpu < GPU_INDEX_MAX && (mask & (1ULL << gpu));
}

static __always_inline int gpu_allowed(struct enforce_config *cfg, u64 agent, u32 kind, u32 major, u32 minor)
{
	struct gpu_policy *policy = gpu_grants.lookup(&agent);
	if (!policy)
		return !cfg->gpu_default_deny;
	if (!policy->allow)
		return 0;
	if (policy->every_gpu)
		return 1;
	struct gpu_node node = gpu_node_of(kind, major, minor);
	if (node.node_class == GPU_NODE_SHARED)
		return 1;
	if (node.node_class == GPU_NODE_GPU)
		return gpu_bit(policy->gpu_mask | policy->mig_mask, node.gpu);
	if (node.node_class == GPU_NODE_MIG) {
		if (gpu_bit(policy->gpu_mask, node.gpu))
			return 1;
		struct gpu_mig_key key = {.agent_id = agent, .major = major, .minor = minor};
		return gpu_mig_grants.lookup(&key) != NULL;
	}
	return 0;
}

/* 1 allows the access (open or mknod) of the device; 0 fails it with EPERM. */
int enforce_device(struct bpf_cgroup_dev_ctx *ctx)
{
	if ((ctx->access_type & 0xffff) != BPF_DEVCG_DEV_CHAR_)
		return 1;
	u32 major = ctx->major;
	u32 *kind = gpu_majors.lookup(&major);
	if (!kind)
		return 1;
	struct enforce_config *cfg = econfig();
	if (!cfg)
		return 1;
	u64 agent = bpf_get_current_ancestor_cgroup_id(cfg->agent_level);
	if (!agent)
		return 1;  /* a process at the agent root itself, not in an agent */
	u32 access = ctx->access_type >> 16;
	if (!gpu_allowed(cfg, agent, *kind, major, ctx->minor)) {
		struct refused_event e = {};
		fill_header(&e.hdr, EVENT_REFUSED, sizeof(e));
		e.agent_id = agent;
		e.reason = REFUSE_GPU;
		e.op = OP_DEVICE;
		e.dry_run = cfg->dry_run;
		e.major = major;
		e.minor = ctx->minor;
		e.access = access;
		count_refusal(REFUSE_GPU);
		submit(&e.hdr, sizeof(e), sizeof(e), WAKE_ALERT);
		return cfg->dry_run ? 1 : 0;
	}
	/* allowed: report it unless the open tracepoint already matched its path */
	u32 tid = (u32)bpf_get_current_pid_tgid();
	if (gpu_pending.lookup(&tid))
		return 1;
	struct device_event d = {};
	fill_header(&d.hdr, EVENT_DEVICE, sizeof(d));
	d.agent_id = agent;
	d.major = major;
	d.minor = ctx->minor;
	d.access = access;
	submit(&d.hdr, sizeof(d), sizeof(d), WAKE_ALERT);
	return 1;
}
