"""The sandbox: egress profiles that say what each agent may reach, compiled for the kernel's
cgroup hooks, which refuse everything else before a packet leaves."""
