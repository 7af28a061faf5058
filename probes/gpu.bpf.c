/* gpu: open/openat/openat2 of paths that start with one of the configured GPU
 * device prefixes (gpu_prefixes, written by the loader), with flags and the
 * return value. Matching happens here so other opens cost no ring space.
 * Relative paths (openat on a /dev dirfd) are not matched: the cgroup device
 * hook of the enforcement layer sees those opens.
 */
BPF_ARRAY(gpu_prefixes, struct gpu_prefix, GPU_PREFIXES_MAX);
BPF_PERCPU_ARRAY(gpu_scratch, struct gpu_open_event, 1);
BPF_TABLE("lru_hash", u32, struct gpu_open_event, gpu_pending, 1024);

struct user_open_how_head {
	u64 flags;
};

static __always_inline int gpu_path_matches(const char *path)
{
	for (u32 i = 0; i < GPU_PREFIXES_MAX; i++) {
		u32 index = i;
		struct gpu_prefix *p = gpu_prefixes.lookup(&index);
		if (!p || p->len == 0)
			return 0;
		u32 j;
		for (j = 0; j < GPU_PREFIX_MAX - 1; j++) {
			if (j >= p->len || path[j] != p->prefix[j])
				break;
		}
		if (j >= p->len)
			return 1;
	}
	return 0;
}

static __always_inline int gpu_enter(u32 syscall, int dfd, const char *filename, u32 flags)
{
	if (!in_scope())
		return 0;
	u32 zero = 0;
	struct gpu_open_event *e = gpu_scratch.lookup(&zero);
	if (!e)
		return 0;
	long n = bpf_probe_read_user_str(e->path, sizeof(e->path), filename);
	if (n <= 0 || !gpu_path_matches(e->path))
		return 0;
	e->hdr.flags = 0;
	if (user_str_truncated(n, sizeof(e->path), filename))
		e->hdr.flags |= EVENT_F_PATH_TRUNCATED;
	e->syscall = syscall;
	e->dfd = dfd;
	e->flags = flags;
	u32 tid = (u32)bpf_get_current_pid_tgid();
	gpu_pending.update(&tid, e);
	return 0;
}

static __always_inline int gpu_exit(long ret)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct gpu_open_event *e = gpu_pending.lookup(&tid);
	if (!e)
		return 0;
	fill_header(&e->hdr, EVENT_GPU_OPEN, sizeof(*e));
	e->retval = ret;
	submit(&e->hdr, sizeof(*e), sizeof(*e), WAKE_ALERT);
	gpu_pending.delete(&tid);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_open)
{
	return gpu_enter(0, -100, args->filename, args->flags);
}

TRACEPOINT_PROBE(syscalls, sys_exit_open)
{
	return gpu_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat)
{
	return gpu_enter(1, args->dfd, args->filename, args->flags);
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat)
{
	return gpu_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat2)
{
	struct user_open_how_head how = {};
	bpf_probe_read_user(&how, sizeof(how), args->how);
	return gpu_enter(2, args->dfd, args->filename, (u32)how.flags);
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat2)
{
	return gpu_exit(args->ret);
}
