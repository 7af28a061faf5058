"""A fake DNS server for the tests and benchmarks, over UDP and TCP on one port: answers
every A question with the next of its addresses (round robin: documentation addresses), AAAA
questions with --aaaa's address when given, anything else with no answer.

    python3 dns_server.py HOST PORT ADDRESS[,ADDRESS...] [--ttl SECONDS] [--aaaa ADDRESS]

Prints "listening" once ready and "answered NAME TYPE" for each question.
"""

import argparse
import itertools
import socket
import struct
import sys
import threading

import dns.message
import dns.rdatatype
import dns.rrset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("answers")
    parser.add_argument("--ttl", type=int, default=60)
    parser.add_argument("--aaaa")
    args = parser.parse_args()
    addresses = itertools.cycle(args.answers.split(","))
    lock = threading.Lock()

    def respond(data: bytes) -> bytes:
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        for question in query.question:
            if question.rdtype == dns.rdatatype.A:
                with lock:
                    address = next(addresses)
                response.answer.append(dns.rrset.from_text(question.name, args.ttl, "IN", "A", address))
            elif question.rdtype == dns.rdatatype.AAAA and args.aaaa:
                response.answer.append(dns.rrset.from_text(question.name, args.ttl, "IN", "AAAA", args.aaaa))
            print("answered", question.name.to_text(omit_final_dot=True),
                  dns.rdatatype.to_text(question.rdtype), flush=True)
        return response.to_wire()

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    udp = socket.socket(family, socket.SOCK_DGRAM)
    udp.bind((args.host, args.port))
    tcp = socket.socket(family, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((args.host, args.port))
    tcp.listen(16)

    def serve_tcp() -> None:
        while True:
            conn, _ = tcp.accept()
            with conn:
                header = conn.recv(2, socket.MSG_WAITALL)
                if len(header) == 2:
                    data = conn.recv(struct.unpack("!H", header)[0], socket.MSG_WAITALL)
                    reply = respond(data)
                    conn.sendall(struct.pack("!H", len(reply)) + reply)

    threading.Thread(target=serve_tcp, daemon=True).start()
    print("listening", flush=True)
    while True:
        data, peer = udp.recvfrom(4096)
        udp.sendto(respond(data), peer)


if __name__ == "__main__":
    sys.exit(main())
