"""A fake DNS server for the tests: answers every A question with one fixed
address (a documentation address nothing listens on), nothing else.

    python3 dns_server.py HOST PORT ANSWER
"""

import socket
import sys

import dns.message
import dns.rdatatype
import dns.rrset


def main() -> None:
    host, port, answer = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind((host, port))
    print("listening", flush=True)
    while True:
        data, peer = server.recvfrom(512)
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        for question in query.question:
            if question.rdtype == dns.rdatatype.A:
                response.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A", answer))
        server.sendto(response.to_wire(), peer)
        print("answered", query.question[0].name, flush=True)


if __name__ == "__main__":
    main()
