/* exec: execve and execveat with filename, argv and return value.
 * The entry probe parks the event in exec_pending (keyed by thread id); the
 * exit probe adds the return value and submits, so failed execs are events too.
 */
BPF_PERCPU_ARRAY(exec_scratch, struct exec_event, 1);  /* never written: a parked event's zeros */
/* Each entry is ~8.5 KiB, preallocated; in flight are at most a few per CPU. */
BPF_TABLE("lru_hash", u32, struct exec_event, exec_pending, 512);

/* A new event parked under tid, every field zero; NULL when it cannot be. */
static __always_inline struct exec_event *exec_park(u32 tid)
{
	u32 zero = 0;
	struct exec_event *blank = exec_scratch.lookup(&zero);
	if (!blank || exec_pending.update(&tid, blank) < 0)
		return NULL;
	return exec_pending.lookup(&tid);
}

static __always_inline void read_argv(struct exec_event *e, const char *const *argv)
{
	u32 off = 0;
	int i;
	for (i = 0; i < EXEC_MAX_ARGS; i++) {
		const char *arg = NULL;
		if (bpf_probe_read_user(&arg, sizeof(arg), &argv[i]) < 0) {
			e->hdr.flags |= EVENT_F_ARGV_UNREADABLE;
			goto done;
		}
		if (!arg)
			goto done;
		if (off > EXEC_ARGS_SIZE - (EXEC_ARG_MAX + 1)) {
			e->hdr.flags |= EVENT_F_ARGV_TRUNCATED;
			goto done;
		}
		long n = bpf_probe_read_user_str(&e->args[off], EXEC_ARG_MAX + 1, arg);
		if (n < 0) {
			e->hdr.flags |= EVENT_F_ARGV_UNREADABLE;
			goto done;
		}
		if (user_str_truncated(n, EXEC_ARG_MAX + 1, arg))
			e->hdr.flags |= EVENT_F_ARG_TRUNCATED;
		off += n;
		e->argc++;
	}
	/* EXEC_MAX_ARGS read: is there one more? */
	{
		const char *more = NULL;
		bpf_probe_read_user(&more, sizeof(more), &argv[EXEC_MAX_ARGS]);
		if (more)
			e->hdr.flags |= EVENT_F_ARGV_TRUNCATED;
	}
done:
	e->args_size = off;
}

static __always_inline int exec_enter(u32 syscall, int dfd, const char *filename,
				      const char *const *argv, u32 at_flags)
{
	if (!in_scope())
		return 0;
	struct exec_event *e = exec_park((u32)bpf_get_current_pid_tgid());
	if (!e)
		return 0;
	e->syscall = syscall;
	e->dfd = dfd;
	e->at_flags = at_flags;
	long n = bpf_probe_read_user_str(e->filename, sizeof(e->filename), filename);
	if (n < 0)
		e->filename[0] = 0;
	else if (user_str_truncated(n, sizeof(e->filename), filename))
		e->hdr.flags |= EVENT_F_PATH_TRUNCATED;
	read_argv(e, argv);
	return 0;
}

static __always_inline int exec_exit(long ret)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct exec_event *e = exec_pending.lookup(&tid);
	if (!e) {
		/* evicted (LRU, a burst of execs in flight) before sched_process_exec parked it again */
		if (in_scope())
			count(EVENT_EXEC, COUNTER_LOST);
		return 0;
	}
	u64 size = offsetof(struct exec_event, args) + e->args_size;
	/* after a successful exec: the new comm, as a user expects to see */
	fill_header(&e->hdr, EVENT_EXEC, size);
	e->retval = ret;
	/* a failed exec starts nothing: no wakeup, and it leaves the wakeup window
	 * to the exec that follows (execvp tries each PATH entry in turn) */
	submit(&e->hdr, size, sizeof(*e), ret < 0 ? WAKE_BULK : WAKE_EXEC);
	exec_pending.delete(&tid);
	return 0;
}

/* Between a successful exec's entry and exit probes.
 * - From a thread other than the leader: the kernel gives the thread the leader's id
 *   (de_thread) before the exit probe runs, so the event parked under the old id moves to
 *   the new one here, or the exit would find nothing.
 * - Nothing parked: the exec began outside the agents' cgroups (a container runtime's child
 *   is moved into the container's cgroup while it execs, its first program) or its entry was
 *   evicted. Parked here, without argv: user space reads it from /proc while the process lives.
 * - The path: the entry probe reads the caller's copy, which a fork's child cannot read when
 *   the page holding it is not mapped in the child yet (a string literal of the parent's
 *   program); the kernel's own copy is this tracepoint's argument. */
TRACEPOINT_PROBE(sched, sched_process_exec)
{
	u32 old = args->old_pid, now = args->pid;
	struct exec_event *e;
	if (old != now) {
		e = exec_pending.lookup(&old);
		if (e) {
			exec_pending.update(&now, e);
			exec_pending.delete(&old);
		}
	}
	e = exec_pending.lookup(&now);
	if (!e) {
		if (!in_scope() || !(e = exec_park(now)))
			return 0;
		e->hdr.flags = EVENT_F_ARGV_UNREADABLE;
	}
	if (e->filename[0])
		return 0;
	u32 loc = args->data_loc_filename;
	if (bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), (void *)args + (loc & 0xFFFF)) < 0)
		e->filename[0] = 0;
	else if ((loc >> 16) > sizeof(e->filename))  /* the length, its NUL included */
		e->hdr.flags |= EVENT_F_PATH_TRUNCATED;
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_execve)
{
	return exec_enter(0, 0, args->filename, args->argv, 0);
}

TRACEPOINT_PROBE(syscalls, sys_exit_execve)
{
	return exec_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_execveat)
{
	return exec_enter(1, args->fd, args->filename, args->argv, args->flags);
}

TRACEPOINT_PROBE(syscalls, sys_exit_execveat)
{
	return exec_exit(args->ret);
}
