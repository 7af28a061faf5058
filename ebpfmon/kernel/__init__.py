"""The kernel layer: the only part of ebpfmon that imports bcc (in probeset)."""
