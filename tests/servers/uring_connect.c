/* A connect through io_uring, which never enters the connect syscall (so its
 * tracepoint does not fire): the daemon's cgroup hooks must still see it, and
 * refuse it when the destination is denied.
 *
 *   uring_connect ADDRESS PORT    prints the connect's result: 0 or -errno
 */
#include <arpa/inet.h>
#include <liburing.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s ADDRESS PORT\n", argv[0]);
		return 2;
	}
	struct io_uring ring;
	int err = io_uring_queue_init(4, &ring, 0);
	if (err < 0) {
		fprintf(stderr, "io_uring_queue_init: %d\n", err);
		return 2;
	}
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
	if (inet_pton(AF_INET, argv[1], &sa.sin_addr) != 1) {
		fprintf(stderr, "not an IPv4 address: %s\n", argv[1]);
		return 2;
	}
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
	io_uring_prep_connect(sqe, fd, (struct sockaddr *)&sa, sizeof(sa));
	io_uring_submit(&ring);
	struct io_uring_cqe *cqe;
	err = io_uring_wait_cqe(&ring, &cqe);
	if (err < 0) {
		fprintf(stderr, "io_uring_wait_cqe: %d\n", err);
		return 2;
	}
	printf("%d\n", cqe->res);
	return 0;
}
