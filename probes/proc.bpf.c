/* proc: fork and exit of tasks in scope, and cgroup creation and removal, so
 * user space keeps its process tree and cgroup names current without walking
 * kernel structs. Bulk events: they never wake the reader.
 */
TRACEPOINT_PROBE(sched, sched_process_fork)
{
	u32 child = args->child_pid;
	u32 parent = bpf_get_current_pid_tgid() >> 32;
	parents.update(&child, &parent);
	if (!in_scope())
		return 0;
	struct fork_event e = {};
	fill_header(&e.hdr, EVENT_FORK, sizeof(e));
	e.child_pid = args->child_pid;
	e.parent_pid = args->parent_pid;
	submit(&e.hdr, sizeof(e), sizeof(e), WAKE_BULK);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
	if (!in_scope())
		return 0;
	struct exit_event e = {};
	fill_header(&e.hdr, EVENT_EXIT, sizeof(e));
	submit(&e.hdr, sizeof(e), sizeof(e), WAKE_BULK);
	return 0;
}

BPF_PERCPU_ARRAY(cgroup_scratch, struct cgroup_event, 1);

/* Only the v2 hierarchy (root 0) carries the ids bpf_get_current_cgroup_id returns. */
static __always_inline struct cgroup_event *cgroup_event_begin(u16 kind, int root, u64 id, int level)
{
	if (root != 0)
		return NULL;
	u32 zero = 0;
	struct cgroup_event *e = cgroup_scratch.lookup(&zero);
	if (!e)
		return NULL;
	fill_header(&e->hdr, kind, sizeof(*e));
	e->hdr.flags = 0;
	e->id = id;
	e->level = level;
	return e;
}

TRACEPOINT_PROBE(cgroup, cgroup_mkdir)
{
	struct cgroup_event *e = cgroup_event_begin(EVENT_CGROUP_MKDIR, args->root, args->id, args->level);
	if (!e)
		return 0;
	TP_DATA_LOC_READ_STR(e->path, path, sizeof(e->path));
	/* a new agent may be refused everything until the daemon has classified it */
	submit(&e->hdr, sizeof(*e), sizeof(*e), WAKE_ALERT);
	return 0;
}

TRACEPOINT_PROBE(cgroup, cgroup_rmdir)
{
	struct cgroup_event *e = cgroup_event_begin(EVENT_CGROUP_RMDIR, args->root, args->id, args->level);
	if (!e)
		return 0;
	TP_DATA_LOC_READ_STR(e->path, path, sizeof(e->path));
	submit(&e->hdr, sizeof(*e), sizeof(*e), WAKE_BULK);
	return 0;
}
