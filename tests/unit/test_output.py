"""Table output: readable, and an agent cannot forge lines or terminal escapes."""

from ebpfmon import output
from ebpfmon.events import ExecEvent, Process


def exec_event(argv, retval=0, truncated=False):
    return ExecEvent(time_ns=1_700_000_000_000_000_000, cgroup_id=5, cgroup="/ebpfmon-agents/a1",
                     proc=Process(pid=4242, tid=4242, ppid=1, uid=0, gid=0, comm="ssh"),
                     filename="/usr/bin/ssh", argv=argv, retval=retval, argv_truncated=truncated)


def test_escapes_control_characters_and_bad_bytes():
    assert output.safe("a\nb\x1b[2Jc\udcff") == "a\\x0ab\\x1b[2Jc\\xff"


def test_exec_line():
    line = output.table_line(exec_event(["ssh", "-R", "8080:localhost:80", "evil\nFAKE LINE"], truncated=True))
    assert "\n" not in line
    assert "/ebpfmon-agents/a1" in line and " 4242 " in line
    assert "execve /usr/bin/ssh  ssh -R 8080:localhost:80 'evil\\x0aFAKE LINE' [argv truncated]  = ok" in line


def test_exec_line_says_where_argv_came_from_when_not_the_probe():
    event = exec_event(["ssh", "-R", "1:h:2", "x"])
    event.filename, event.argv_source = "", "proc"
    assert "execve   ssh -R 1:h:2 x [argv from /proc]  = ok" in output.table_line(event)
    event.argv, event.argv_source = [], "none"
    assert "[argv unreadable]" in output.table_line(event)


def test_failed_exec_shows_errno_name():
    assert output.table_line(exec_event(["ssh"], retval=-13)).endswith("= EACCES")


def test_long_cgroup_keeps_its_end():
    assert output._clip("/a/very/long/path/to/the/agent-1234", 12) == "…/agent-1234"


def test_header_lines_up_with_rows():
    head = output.header()
    row = output.table_line(exec_event(["ssh"]))
    assert head.index("WHAT") == row.index("execve")
