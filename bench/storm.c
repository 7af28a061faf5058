/* Syscall storms for the benchmarks: N execs, connects or opens, optionally
 * paced to a target rate. Prints the wall time in seconds.
 *
 *   storm exec N [RATE]      fork + execve /bin/true, N times
 *   storm connect N [RATE]   TCP connect to 127.0.0.1:PORT (closed: ECONNREFUSED)
 *   storm open N [RATE]      open + close of a path (default /dev/null)
 *
 * RATE is operations per second (0: as fast as possible).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void pace(double start, long done, double rate)
{
	if (rate <= 0)
		return;
	double due = start + done / rate;
	double wait = due - now();
	if (wait > 0) {
		struct timespec ts = {(time_t)wait, (long)((wait - (time_t)wait) * 1e9)};
		nanosleep(&ts, NULL);
	}
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: storm exec|connect|open N [RATE] [PORT|PATH]\n");
		return 2;
	}
	const char *mode = argv[1];
	long n = atol(argv[2]);
	double rate = argc > 3 ? atof(argv[3]) : 0;
	const char *arg = argc > 4 ? argv[4] : NULL;
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(arg ? atoi(arg) : 1)};
	inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
	double start = now();
	for (long i = 0; i < n; i++) {
		pace(start, i, rate);
		if (!strcmp(mode, "exec")) {
			pid_t pid = fork();
			if (pid == 0) {
				char *args[] = {"/bin/true", NULL};
				execve("/bin/true", args, NULL);
				_exit(127);
			}
			waitpid(pid, NULL, 0);
		} else if (!strcmp(mode, "connect")) {
			int s = socket(AF_INET, SOCK_STREAM, 0);
			connect(s, (struct sockaddr *)&addr, sizeof(addr));
			close(s);
		} else if (!strcmp(mode, "open")) {
			int fd = open(arg ? arg : "/dev/null", O_RDONLY);
			if (fd >= 0)
				close(fd);
		} else {
			fprintf(stderr, "unknown mode %s\n", mode);
			return 2;
		}
	}
	printf("%.6f\n", now() - start);
	return 0;
}
