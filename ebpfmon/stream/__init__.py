"""The event stream: ring-buffer records decoded into events, enriched with the process tree,
cgroup names and devices, and handed on."""
