"""Feature probes for the doctor: can this kernel load each kind of program?"""

from __future__ import annotations

import mmap

from ebpfmon.kernel.probeset import RING_READER, import_bcc
from ebpfmon.kernel.ringbuf import RingBufferReader

RINGBUF_TEST = r"""
BPF_RINGBUF_OUTPUT(test_ring, 1);
TRACEPOINT_PROBE(syscalls, sys_enter_getpid) {
    u32 v = 1;
    test_ring.ringbuf_output(&v, sizeof(v), 0);
    return 0;
}
"""

# the program types enforcement attaches to cgroups, with trivial allow-all bodies
CGROUP_HOOK_TEST = r"""
int skb_hook(struct __sk_buff *skb) { return 1; }
int sock_addr_hook(struct bpf_sock_addr *ctx) { return 1; }
int device_hook(struct bpf_cgroup_dev_ctx *ctx) { return 1; }
"""

CGROUP_HOOKS = ("skb ingress/egress", "connect4", "connect6", "sendmsg4", "sendmsg6", "device")

OPTIONAL_PROGRAMS = {
    "kprobes": "Not needed: ebpfmon uses tracepoints only (CONFIG_KPROBES).",
    "fentry": "Not needed: ebpfmon uses tracepoints only.",
}


def ring_buffer() -> None:
    """A ring buffer loads, and maps into this process the way the reader reads it."""
    bcc = import_bcc()
    b = bcc.BPF(text=RINGBUF_TEST.encode())
    try:
        if RING_READER == "mmap":
            RingBufferReader(b[b"test_ring"].map_fd, mmap.PAGESIZE, lambda record: None).close()
    finally:
        b.cleanup()


def cgroup_hook(hook: str) -> None:
    bcc = import_bcc()
    b = bcc.BPF(text=CGROUP_HOOK_TEST.encode())
    try:
        if hook == "device":
            b.load_func("device_hook", bcc.BPF.CGROUP_DEVICE)
        elif hook.startswith("skb"):
            b.load_func("skb_hook", bcc.BPF.CGROUP_SKB)
        else:
            attach = {
                "connect4": bcc.BPFAttachType.CGROUP_INET4_CONNECT,
                "connect6": bcc.BPFAttachType.CGROUP_INET6_CONNECT,
                "sendmsg4": bcc.BPFAttachType.CGROUP_UDP4_SENDMSG,
                "sendmsg6": bcc.BPFAttachType.CGROUP_UDP6_SENDMSG,
            }[hook]
            b.load_func("sock_addr_hook", bcc.BPF.CGROUP_SOCK_ADDR, attach_type=attach)
    finally:
        b.cleanup()


def optional(name: str) -> None:
    bcc = import_bcc()
    if name == "kprobes":
        b = bcc.BPF(text=b"int probe(void *ctx) { return 0; }")
        try:
            b.attach_kprobe(event=b.get_syscall_fnname("getpid"), fn_name="probe")
        finally:
            b.cleanup()
    elif name == "fentry":
        if not bcc.BPF.support_kfunc():
            raise RuntimeError("fentry (kfunc) programs are not supported by this kernel")
        try:
            b = bcc.BPF(text=b"KFUNC_PROBE(do_nanosleep) { return 0; }")
        except Exception as e:  # bcc says "Need super-user privileges" for any refusal, root or not
            raise RuntimeError(f"this kernel refused an fentry program (bcc: {e})") from None
        b.cleanup()
