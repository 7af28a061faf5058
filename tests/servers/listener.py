"""TCP listeners on some ports that count who reached them: a test asks it whether a connect
that should have been refused got anywhere.

    python3 listener.py HOST PORT [PORT...]

Prints "listening" once all are bound, then "accepted PORT PEER" per connection.
"""

import socket
import sys
import threading


def serve(server: socket.socket, port: int) -> None:
    while True:
        conn, peer = server.accept()
        print(f"accepted {port} {peer[0]}:{peer[1]}", flush=True)
        conn.close()


def main() -> None:
    host, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
    servers = []
    for port in ports:
        server = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((host, port))
        server.listen(4096)
        servers.append((server, port))
    print("listening", flush=True)
    threads = [threading.Thread(target=serve, args=pair, daemon=True) for pair in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main()
