"""ebpfmon: watch autonomous agents from the kernel, and stop them when they misbehave."""

__version__ = "0.1.0"
