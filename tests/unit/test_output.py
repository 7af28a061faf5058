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


def test_text_that_changes_how_a_line_reads_is_shown_escaped():
    from ebpfmon.output import safe

    # a bidi override shows "ssh -R" reversed; U+2028 starts a fake line in a log viewer
    assert safe("curl x\u202egnp.exe") == "curl x\\u202egnp.exe"
    assert safe("a\u2028FAKE LOG LINE") == "a\\u2028FAKE LOG LINE"
    assert safe("\u2066\u2069\u200b\ufeff") == "\\u2066\\u2069\\u200b\\ufeff"
    assert safe("\x1b[2Jcleared") == "\\x1b[2Jcleared"  # an ANSI sequence in a process name
    assert safe("naïve façade 日本") == "naïve façade 日本"  # text in other scripts stays


def test_slack_text_cannot_ping_a_channel_or_hide_a_link():
    from ebpfmon.alerts.sinks import slack_text

    assert slack_text("cmdline=echo <!channel> <https://evil.example|docs> a&b") == \
        "cmdline=echo &lt;!channel&gt; &lt;https://evil.example|docs&gt; a&amp;b"


def test_quarantine_list_escapes_what_an_agent_named(capsys):
    from ebpfmon.cli.quarantine import _show

    record = {"agent": "/ebpfmon-agents/a\x1b]0;pwned\x07", "status": "released", "opened_ns": 0,
              "rule": "Reverse SSH tunnel", "actions": [{"action": "cut_network", "result": "applied"}],
              "connections": [{"protocol": "tcp", "local": "10.0.0.2:5", "remote": "192.0.2.1:22",
                               "state": "established", "pid": 7, "comm": "ssh\x1b[31m\u202e"}],
              "released_ns": 0, "released_by": "root", "release_reason": "ok\u2028Released by admin"}
    _show(record)
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and "\u202e" not in shown and "\u2028" not in shown
    assert "a\\x1b]0;pwned\\x07" in shown and "ssh\\x1b[31m\\u202e" in shown and "ok\\u2028Released" in shown
