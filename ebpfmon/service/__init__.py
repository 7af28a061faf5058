"""The service: assembling the kernel side from a configuration, the daemon that coordinates
the stages, its control socket, metrics and systemd notifications."""
