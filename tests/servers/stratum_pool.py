"""A fake stratum mining pool for the tests: answers mining.subscribe,
mining.authorize and login (XMRig's dialect) with canned JSON-RPC replies and
hands out a dummy job. No hashing, no real coin: it only speaks enough of the
protocol that a client believes it reached a pool.

    python3 stratum_pool.py HOST PORT
"""

import json
import socket
import sys
import threading


def reply(request: dict) -> dict:
    method = request.get("method")
    if method == "mining.subscribe":
        result = [[["mining.notify", "ebpfmon-test"]], "00000000", 4]
    elif method in ("mining.authorize", "mining.submit"):
        result = True
    elif method == "login":
        result = {"id": "ebpfmon-test", "job": {"job_id": "1", "blob": "00" * 76, "target": "ffffffff"},
                  "status": "OK"}
    else:
        return {"id": request.get("id"), "result": None, "error": [20, "unknown method", None]}
    return {"id": request.get("id"), "result": result, "error": None}


def serve(conn: socket.socket) -> None:
    with conn, conn.makefile("rwb") as f:
        for line in f:
            try:
                request = json.loads(line)
            except ValueError:
                break
            f.write(json.dumps(reply(request)).encode() + b"\n")
            f.flush()


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    server = socket.create_server((host, port), reuse_port=False)
    print("listening", flush=True)
    while True:
        conn, peer = server.accept()
        print(f"accepted {peer[0]}:{peer[1]}", flush=True)  # the tests count these
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
