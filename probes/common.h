/* Maps and helpers every probe uses. Included once, before the probe sources,
 * by the loader (ebpfmon/kernel/probeset.py), which defines RINGBUF_PAGES.
 * No kernel headers beyond what bcc brings: the probes read no kernel structs,
 * and <linux/sched.h> alone is a large part of compiling at every start.
 */
#include "events.h"

#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 1024
#endif

/* Wakeup policy. Waking the reader costs more than most probes, so events
 * that only keep user-space state current (fork, exit, cgroup removals, failed
 * execs) never wake it; the reader drains them on a timer. Events that can lead to
 * containment wake it at once, unless another event of their class (execs;
 * the others) woke it less than WAKE_WINDOW_NS ago: the reader, after a batch
 * with such an event, polls again within the window (ebpfmon/stream/stream.py), so
 * those that did not wake it wait at most that long, and a storm is read in
 * batches (one wakeup per record slows an exec storm down, and costs the
 * reader more per connect than judging it; bench/README.md). Each class has its own clock so a connect storm never delays an exec's
 * wakeup: an exec can start a tunnel a few milliseconds later. (The ring
 * buffer's adaptive wakeup is no substitute: a record behind an unconsumed
 * no-wakeup record wakes nobody, and a busy reader is woken per record.)
 */
#define WAKE_BULK BPF_RB_NO_WAKEUP
#define WAKE_EXEC windowed_wake(0)
#define WAKE_ALERT windowed_wake(1)

#ifndef WAKE_WINDOW_NS
#error "the loader defines WAKE_WINDOW_NS (ebpfmon/kernel/probeset.py)"
#endif

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_ARRAY(config, struct probe_config, 1);
BPF_ARRAY(last_wake, u64, 2);  /* per wakeup class: exec, alert */

static __always_inline u64 windowed_wake(u32 wake_class)
{
	u64 now = bpf_ktime_get_ns();
	u64 *last = last_wake.lookup(&wake_class);
	if (!last)
		return BPF_RB_FORCE_WAKEUP;
	if (now - *last < WAKE_WINDOW_NS)
		return BPF_RB_NO_WAKEUP;
	*last = now;  /* racing CPUs: at worst one extra wakeup */
	return BPF_RB_FORCE_WAKEUP;
}
BPF_HASH(scope_cgroups, u64, u8, 4096);
BPF_PERCPU_ARRAY(counters, u64, EVENT_KIND_MAX * COUNTER_MAX);
/* task id -> parent tgid, from every fork on the host (a map update, no
 * event). A process forked outside an agent cgroup and moved in before it
 * execs still has its parent in its events. Every new task overwrites its
 * own entry, so a reused pid never inherits a stale parent.
 */
BPF_TABLE("lru_hash", u32, u32, parents, 65536);

static __always_inline void count(u32 kind, u32 counter)
{
	u32 idx = kind * COUNTER_MAX + counter;
	u64 *value = counters.lookup(&idx);
	if (value)
		(*value)++;
}

/* The walk behind in_scope(): the cgroup or one of its ancestors is in
 * scope_cgroups. Ancestors, not only the cgroup itself, so a cgroup created
 * under an agent root is covered from its first instruction, before user
 * space has heard of it.
 */
static __always_inline int scope_walk(u64 id)
{
	if (scope_cgroups.lookup(&id))
		return 1;
	for (int level = 1; level < SCOPE_MAX_DEPTH; level++) {
		u64 ancestor = bpf_get_current_ancestor_cgroup_id(level);
		/* 0 past the task's own level; the task's own id at its level */
		if (ancestor == 0 || ancestor == id)
			return 0;
		if (scope_cgroups.lookup(&ancestor))
			return 1;
	}
	return 0;
}

/* The last verdict on each CPU. Syscalls come in runs from the same cgroup,
 * and these probes run on every open and connect on the host: a hit costs an
 * array read instead of a hash lookup per cgroup level. A cgroup's ancestors
 * never change, so only a change of scope (a new generation) invalidates. */
struct scope_verdict {
	u64 cgroup_id;
	u32 generation;
	u32 in_scope;
};
BPF_PERCPU_ARRAY(scope_cache, struct scope_verdict, 1);

/* True when the current task is one we watch. */
static __always_inline int in_scope(void)
{
	u32 zero = 0;
	struct probe_config *cfg = config.lookup(&zero);
	if (!cfg)
		return 0;
	if ((bpf_get_current_pid_tgid() >> 32) == cfg->ignore_tgid)
		return 0;
	if (cfg->all_cgroups)
		return 1;
	u32 generation = cfg->scope_generation;  /* read before the walk: see scope_verdict */
	u64 id = bpf_get_current_cgroup_id();
	struct scope_verdict *cached = scope_cache.lookup(&zero);
	if (!cached)
		return scope_walk(id);
	if (cached->cgroup_id == id && cached->generation == generation)
		return cached->in_scope;
	int verdict = scope_walk(id);
	cached->cgroup_id = id;
	cached->generation = generation;
	cached->in_scope = verdict;
	return verdict;
}

/* Fills all of the header but flags, which the probe sets as it goes. */
static __always_inline void fill_header(struct event_header *hdr, u16 kind, u32 size)
{
	u64 pid_tgid = bpf_get_current_pid_tgid();
	u64 uid_gid = bpf_get_current_uid_gid();
	hdr->kind = kind;
	hdr->size = size;
	hdr->time_ns = bpf_ktime_get_boot_ns();
	hdr->cgroup_id = bpf_get_current_cgroup_id();
	hdr->pid = pid_tgid >> 32;
	hdr->tid = (u32)pid_tgid;
	u32 tgid = hdr->pid;
	u32 *ppid = parents.lookup(&tgid);
	hdr->ppid = ppid ? *ppid : 0;
	hdr->uid = (u32)uid_gid;
	hdr->gid = uid_gid >> 32;
	bpf_get_current_comm(hdr->comm, sizeof(hdr->comm));
}

/* Events lost (ring buffer full), by the cgroup whose event it was: a flood names its makers. */
BPF_TABLE("lru_percpu_hash", u64, u64, lost_by_cgroup, 4096);

static __always_inline void count_lost_of(u64 cgroup_id)
{
	u64 *value = lost_by_cgroup.lookup(&cgroup_id);
	if (value) {
		(*value)++;
	} else {
		u64 one = 1;
		lost_by_cgroup.update(&cgroup_id, &one);
	}
}

#define TRUNCATION_FLAGS (EVENT_F_ARGV_TRUNCATED | EVENT_F_ARG_TRUNCATED | \
			  EVENT_F_PATH_TRUNCATED | EVENT_F_PAYLOAD_TRUNCATED)

/* Copies a finished event of at most max_size bytes into the ring buffer;
 * counts it when it cannot. The bound is checked here, next to the helper
 * call, because the verifier loses it when the size passes through the stack.
 */
static __always_inline void submit(struct event_header *hdr, u64 size, u64 max_size, u64 wake)
{
	u16 kind = hdr->kind;
	if (hdr->flags & TRUNCATION_FLAGS)
		count(kind, COUNTER_TRUNCATED);
	if (size > max_size)
		size = max_size;
	if (events.ringbuf_output(hdr, size, wake) < 0) {
		count(kind, COUNTER_LOST);
		count_lost_of(hdr->cgroup_id);
	}
}

/* Refusals (and the failed syscalls behind them) reported per cgroup and window: an agent
 * looping on refused connects (a cut one, say) would otherwise fill the ring buffer and delay
 * every other agent's events, containment included. Past the budget they are counted
 * (COUNTER_THROTTLED), and the refusal counters still count every one. */
#define REFUSAL_BUDGET 64
#define REFUSAL_WINDOW_NS 1000000000ULL
struct refusal_budget {
	u64 window_start;
	u64 used;
};
BPF_TABLE("lru_hash", u64, struct refusal_budget, refusal_budgets, 4096);

static __always_inline int refusal_reportable(u32 kind)
{
	u64 id = bpf_get_current_cgroup_id();
	u64 now = bpf_ktime_get_ns();
	struct refusal_budget *budget = refusal_budgets.lookup(&id);
	if (!budget || now - budget->window_start > REFUSAL_WINDOW_NS) {
		struct refusal_budget fresh = {.window_start = now, .used = 1};
		refusal_budgets.update(&id, &fresh);
		return 1;
	}
	if (__sync_fetch_and_add(&budget->used, 1) < REFUSAL_BUDGET)
		return 1;
	count(kind, COUNTER_THROTTLED);
	return 0;
}

/* bpf_probe_read_user_str returns the bytes copied with the NUL, so a return
 * equal to the buffer may be a string that fits exactly: look at the next byte.
 */
static __always_inline int user_str_truncated(long copied, u32 bufsize, const char *src)
{
	char next = 0;
	if (copied < (long)bufsize)
		return 0;
	bpf_probe_read_user(&next, 1, src + bufsize - 1);
	return next != 0;
}
