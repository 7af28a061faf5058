"""A stratum client for the tests: optionally opens a (fake) GPU device node,
then connects to a pool and subscribes. Prints the pool's answer.

    python3 stratum_client.py HOST PORT [GPU_NODE]
"""

import json
import os
import socket
import sys

host, port = sys.argv[1], int(sys.argv[2])
if len(sys.argv) > 3:
    try:
        os.close(os.open(sys.argv[3], os.O_RDWR))
    except OSError:
        pass  # a fake node has no driver behind it: the open is what counts
with socket.create_connection((host, port), timeout=5) as s, s.makefile("rwb") as f:
    f.write(json.dumps({"id": 1, "method": "mining.subscribe", "params": ["ebpfmon-test/1.0"]}).encode() + b"\n")
    f.flush()
    print(json.loads(f.readline())["result"][1])
