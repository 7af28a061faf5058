"""The host as ebpfmon reads it: cgroups and where agents are, devices, networks, sockets, users."""
