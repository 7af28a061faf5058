"""Where alerts go: console, JSON lines file, webhook, Slack, PagerDuty, Alertmanager.

Each sink turns an alert (a dict, see incidents.py) into its own wire format.
Local sinks (console, file) cannot be down and write at once; remote sinks
raise DeliveryError and are retried from the spool. HTTP with urllib, the
standard library's client.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import json
import os
import select
import socket
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ebpfmon.errors import ConfigError, DeliveryError
from ebpfmon.events import image_parts
from ebpfmon.output import clock
from ebpfmon.rules.vocabulary import PRIORITY_RANK

if TYPE_CHECKING:  # config validates sink types against SINKS below
    from ebpfmon.config import SinkSettings

# Falco priority -> PagerDuty severity
# RFC 5424's facilities, by number
SYSLOG_FACILITIES = ("kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv",
                     "ftp", "ntp", "audit", "alert", "clock", "local0", "local1", "local2", "local3", "local4",
                     "local5", "local6", "local7")
PD_SEVERITY = {"EMERGENCY": "critical", "ALERT": "critical", "CRITICAL": "critical", "ERROR": "error",
               "WARNING": "warning", "NOTICE": "info", "INFORMATIONAL": "info", "DEBUG": "info"}
COLOURS = {"critical": "\x1b[1;31m", "error": "\x1b[31m", "warning": "\x1b[33m", "info": "\x1b[36m"}


def secret(inline: str, file: str, env: str, what: str) -> str:
    """A secret from a file, the environment, or inline, in that order of preference."""
    if file:
        try:
            return Path(file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read the {what} from {file}: {e.strerror}.",
                              "The file must exist and be readable by ebpfmon.") from e
    if env:
        value = os.environ.get(env)
        if not value:
            raise ConfigError(f"the {what} should be in ${env}, which is not set.", f"Set {env} for the daemon.")
        return value
    return inline


class Sink:
    remote = True
    # seconds after which an open incident is sent again (a service that forgets alerts not
    # re-sent: Alertmanager); None: sent when new and when its count grows
    refresh_seconds: float | None = None

    def __init__(self, settings: SinkSettings, node: str):
        self.settings = settings
        self.name = settings.name or settings.type
        self.node = node
        self.min_rank = PRIORITY_RANK[settings.min_priority.upper()]

    # whether the audit log's chain head goes here too (the fleet's copy to check a node's log against)
    takes_chain_head = False

    def wants(self, alert: dict[str, Any]) -> bool:
        if alert["action"] == CHAIN_HEAD:
            return self.takes_chain_head
        return PRIORITY_RANK.get(alert["priority"], 0) <= self.min_rank

    def deliver(self, alert: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Lets go of connections (once no worker delivers any more)."""

    def post(self, url: str, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout) as response:
                if response.status >= 300:
                    raise DeliveryError(f"{self.name}: HTTP {response.status}")
        except urllib.error.HTTPError as e:
            try:
                text = e.read()[:200]
            except (OSError, http.client.HTTPException):
                text = b""
            raise DeliveryError(f"{self.name}: HTTP {e.code} {text!r}",
                                permanent=400 <= e.code < 500 and e.code not in RETRIED_4XX) from e
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
            # a reset, a malformed status line or header: the service, not the alert, is at fault
            raise DeliveryError(f"{self.name}: {getattr(e, 'reason', None) or type(e).__name__}: {e}") from e


# what each service takes: PagerDuty refuses events over 512 KB, Slack cuts long texts; what is
# trimmed stays whole in the quarantine record and the audit log, which the alert points to
PAGERDUTY_DETAILS_MAX = 256 << 10
SLACK_TEXT_MAX = 3000
TRIMMED_ARGS = 32  # arguments kept of a trimmed command line
TRIMMED_CONNECTIONS = 20  # connections kept of a trimmed quarantine record
RETRIED_4XX = (408, 429)  # request timeout, too many requests: the service asks to be tried again
CHAIN_HEAD = "audit_head"  # the action of the audit log's chain head, sent to the sinks that take it


def record_pointer(alert: dict[str, Any], node: str) -> str:
    return (f"whole in 'ebpfmon quarantine list' and the audit log on {node}, agent {alert.get('agent') or '-'}, "
            f"incident {alert.get('incident')}")


def within(limit: int, details: dict[str, Any], alert: dict[str, Any], node: str) -> dict[str, Any]:
    """details, trimmed until their JSON is under limit bytes: ancestors' command lines first,
    then the event's arguments, the record's connections, the output; with where the rest is."""
    def size(d) -> int:
        return len(json.dumps(d, default=str))
    if size(details) <= limit:
        return details
    details = json.loads(json.dumps(details, default=str))  # a copy to cut
    event = details.get("event") or {}
    steps = [
        lambda: [a.pop("argv", None) for a in event.get("ancestry") or [] if isinstance(a, dict)],
        lambda: event.update(argv=(event.get("argv") or [])[:TRIMMED_ARGS]) if "argv" in event else None,
        lambda: (details.get("quarantine") or {}).update(
            connections=(details["quarantine"].get("connections") or [])[:TRIMMED_CONNECTIONS])
        if isinstance(details.get("quarantine"), dict) else None,
        lambda: details.update(output=str(details.get("output") or "")[:4096]),
        lambda: event.update(argv=[str(a)[:256] for a in event.get("argv") or []]) if "argv" in event else None,
        lambda: details.update(event={k: event.get(k) for k in ("kind", "time_ns", "cgroup", "filename")},
                               quarantine=None),
    ]
    for step in steps:
        step()
        if size(details) <= limit:
            break
    details["trimmed"] = record_pointer(alert, node)
    return details


def formatted(form: str, alert: dict[str, Any], node: str) -> dict[str, Any] | None:
    """The alert in a sink's format; None when that format has no such message (Falco: resolves)."""
    if form == "falco":
        return falco(alert, node) if alert["action"] != "resolve" else None
    return alert


def falco(alert: dict[str, Any], node: str) -> dict[str, Any]:
    """Falco's JSON output (json_output: true, json_include_output_property, tags), as
    falcosidekick reads it: output is Falco's line (time, priority, the rule's output),
    output_fields the fields the rule's output names, with evt.time; ebpfmon's own fields
    ride along under output_fields too (agent, incident), where Falco puts extra fields."""
    when = dt.datetime.fromtimestamp(alert["time_ns"] // 10**9, dt.timezone.utc)
    nanos = alert["time_ns"] % 10**9
    priority = alert["priority"].capitalize()
    fields = {"evt.time": alert["time_ns"], **container_fields((alert.get("event") or {}).get("container")),
              **(alert.get("output_fields") or {}),
              "ebpfmon.agent": alert.get("agent"), "ebpfmon.incident": alert.get("incident"),
              "ebpfmon.count": alert.get("count", 1)}
    return {"hostname": node, "output": f"{when:%H:%M:%S}.{nanos:09d}: {priority} {alert['output']}",
            "priority": priority, "rule": alert["rule"], "source": "syscall", "tags": list(alert.get("tags") or []),
            "time": f"{when:%Y-%m-%dT%H:%M:%S}.{nanos:09d}Z", "output_fields": fields}


def container_fields(container: dict[str, Any] | None) -> dict[str, Any]:
    """Falco's container fields of an alert's event (none for an agent in no container)."""
    if not container:
        return {}
    repository, tag = image_parts(container.get("image"))
    return {"container.id": container["id"], "container.name": container.get("name"),
            "container.image.repository": repository, "container.image.tag": tag,
            **{f"container.label[{k}]": v for k, v in (container.get("labels") or {}).items()}}


def summary(alert: dict[str, Any]) -> str:
    if alert["action"] == CHAIN_HEAD:
        return f"audit chain head {alert['hash']} after {alert['records']} record(s) in {alert['file']}"
    verb = "resolved" if alert["action"] == "resolve" else alert["priority"]
    count = f" (x{alert['count']})" if alert.get("count", 1) > 1 else ""
    return f"[{verb}] {alert['rule']}{count}: {alert['output']}"


class ConsoleSink(Sink):
    remote = False

    def deliver(self, alert: dict[str, Any]) -> None:
        line = f"{clock(alert['time_ns'])} {summary(alert)}"
        if sys.stdout.isatty():
            colour = COLOURS.get(PD_SEVERITY.get(alert["priority"], "info"), "")
            line = f"{colour}{line}\x1b[0m"
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class JsonlSink(Sink):
    remote = False

    def deliver(self, alert: dict[str, Any]) -> None:
        body = formatted(self.settings.format, alert, self.node)
        if body is None:
            return
        path = Path(self.settings.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(body, separators=(",", ":")) + "\n")


class WebhookSink(Sink):
    def __init__(self, settings: SinkSettings, node: str):
        super().__init__(settings, node)
        self.url = secret(settings.url, settings.url_file, settings.url_env, f"URL of sink {self.name}")

    def deliver(self, alert: dict[str, Any]) -> None:
        body = formatted(self.settings.format, alert, self.node)
        if body is not None:
            self.post(self.url, body)


class SlackSink(WebhookSink):
    def deliver(self, alert: dict[str, Any]) -> None:
        text = slack_text(f"ebpfmon on {self.node}: {summary(alert)}")
        if len(text) > SLACK_TEXT_MAX:
            text = text[:SLACK_TEXT_MAX] + f"... (trimmed: {record_pointer(alert, self.node)})"
        self.post(self.url, {"text": text})


def slack_text(text: str) -> str:
    """Text Slack shows as written: its control sequences (<!channel>, <url|label>, &) escaped the
    way Slack documents, so an agent's command line cannot ping a channel or hide a link."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class PagerDutySink(Sink):
    """PagerDuty Events API v2: one incident per (rule, agent), by dedup_key."""

    DEFAULT_URL = "https://events.pagerduty.com/v2/enqueue"

    def __init__(self, settings: SinkSettings, node: str):
        super().__init__(settings, node)
        self.url = secret(settings.url, settings.url_file, settings.url_env, "PagerDuty URL") or self.DEFAULT_URL
        self.routing_key = secret(settings.routing_key, settings.routing_key_file, settings.routing_key_env,
                                  f"routing key of sink {self.name}")

    def body(self, alert: dict[str, Any]) -> dict[str, Any]:
        body = {"routing_key": self.routing_key, "event_action": alert["action"], "dedup_key": alert["incident"]}
        if alert["action"] == "trigger":
            body["payload"] = {
                "summary": summary(alert)[:1024],
                "source": self.node,
                "severity": PD_SEVERITY.get(alert["priority"], "info"),
                "timestamp": dt.datetime.fromtimestamp(alert["time_ns"] / 1e9, dt.timezone.utc).isoformat(),
                "component": alert.get("agent") or "ebpfmon",
                "group": alert["rule"],
                "class": "ebpfmon",
                "custom_details": within(PAGERDUTY_DETAILS_MAX, {
                    k: alert.get(k) for k in ("rule", "priority", "output", "agent", "count", "actions", "event",
                                              "quarantine")}, alert, self.node),
            }
        return body

    def deliver(self, alert: dict[str, Any]) -> None:
        self.post(self.url, self.body(alert))


class AlertmanagerSink(Sink):
    """Prometheus Alertmanager API v2; a resolve sets endsAt. Alertmanager resolves an alert by
    itself once its endsAt passes: a trigger's endsAt is HOLD_SECONDS after it is sent, and an
    open incident is sent again every refresh_seconds, well before that."""

    HOLD_SECONDS = 600
    refresh_seconds = 120.0

    def __init__(self, settings: SinkSettings, node: str):
        super().__init__(settings, node)
        self.base = secret(settings.url, settings.url_file, settings.url_env, "Alertmanager URL").rstrip("/")

    def body(self, alert: dict[str, Any]) -> list[dict[str, Any]]:
        starts = dt.datetime.fromtimestamp(alert["opened_ns"] / 1e9, dt.timezone.utc).isoformat()
        item = {
            "labels": {"alertname": "ebpfmon", "rule": alert["rule"], "severity": PD_SEVERITY.get(
                alert["priority"], "info"), "priority": alert["priority"], "node": self.node,
                "agent_cgroup": alert.get("agent") or "", "incident": alert["incident"]},
            "annotations": {"summary": summary(alert)[:1024],
                            "details": json.dumps({k: alert.get(k) for k in ("output", "count", "actions")})},
            "startsAt": starts,
        }
        if alert["action"] == "resolve":
            item["endsAt"] = dt.datetime.fromtimestamp(alert["time_ns"] / 1e9, dt.timezone.utc).isoformat()
        else:
            item["endsAt"] = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=self.HOLD_SECONDS)).isoformat()
        return [item]

    def deliver(self, alert: dict[str, Any]) -> None:
        self.post(f"{self.base}/api/v2/alerts", self.body(alert))


class SyslogSink(Sink):
    """RFC 5424 messages over TCP with octet-counted framing (RFC 6587), or TLS (RFC 5425): the
    way most SIEMs ingest. The key fields are structured data (SD-ID ebpfmon@32473), the text
    is the alert's summary (agent text in it already escaped); one connection, made again
    after a failure. Syslog has no acknowledgements: a message written just as the server dies
    can be lost, which a server that closes its connections first does not cause."""

    SD_ID = "ebpfmon@32473"  # 32473: the enterprise number RFC 5612 sets aside for documentation
    takes_chain_head = True

    def __init__(self, settings: SinkSettings, node: str):
        super().__init__(settings, node)
        host, _, port = settings.address.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.facility = SYSLOG_FACILITIES.index(settings.facility)
        self.sock: socket.socket | None = None
        self.context = None
        if settings.tls:
            self.context = ssl.create_default_context(cafile=settings.tls_ca_file or None)

    def message(self, alert: dict[str, Any]) -> bytes:
        severity = PRIORITY_RANK.get(alert["priority"], 6)  # the priorities are syslog's, in its order
        when = dt.datetime.fromtimestamp(alert["time_ns"] / 1e9, dt.timezone.utc)
        if alert["action"] == CHAIN_HEAD:
            params = {k: str(alert[k]) for k in ("hash", "records", "file")}
        else:
            params = {"rule": alert["rule"], "priority": alert["priority"], "agent": alert.get("agent") or "",
                      "incident": alert.get("incident") or "", "count": str(alert.get("count", 1)),
                      "actions": ",".join(alert.get("actions") or []), "action": alert["action"]}
        data = " ".join(f'{k}="{sd_escape(v)}"' for k, v in params.items())
        host = (self.node or "-")[:255].replace(" ", "_")
        header = (f"<{self.facility * 8 + severity}>1 {when:%Y-%m-%dT%H:%M:%S.%fZ} {host} ebpfmon {os.getpid()} "
                  f"{alert['action']} [{self.SD_ID} {data}] ")
        return header.encode() + summary(alert).encode("utf-8", "backslashreplace")

    def deliver(self, alert: dict[str, Any]) -> None:
        frame = self.message(alert)
        frame = str(len(frame)).encode() + b" " + frame
        try:
            if self.sock is not None and select.select([self.sock], [], [], 0)[0]:
                # a syslog server sends nothing: readable is its FIN (it went away). A write would
                # still succeed once, into the void, before the error: make the connection again
                self.close()
            if self.sock is None:
                sock = socket.create_connection((self.host, self.port), timeout=self.settings.timeout)
                self.sock = self.context.wrap_socket(sock, server_hostname=self.host) if self.context else sock
            self.sock.sendall(frame)
        except (OSError, ssl.SSLError) as e:
            self.close()
            raise DeliveryError(f"{self.name}: {self.host}:{self.port}: {e}") from e

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class NatsSink(Sink):
    """NATS JetStream: each alert published to SUBJECT.NODE.alert.PRIORITY (node dots as
    underscores, priority in lower case), delivered when JetStream acknowledged it, with a
    Nats-Msg-Id made from the alert, so a retry after a lost acknowledgement is stored once
    (within the stream's duplicate window). The stream is made when missing. nats-py is asyncio:
    the sink's worker thread runs its own loop."""

    def __init__(self, settings: SinkSettings, node: str):
        super().__init__(settings, node)
        self.url = secret(settings.url, settings.url_file, settings.url_env, f"URL of sink {self.name}")
        self.prefix = settings.subject
        self.node_token = node.replace(".", "_").replace(" ", "_") or "node"
        self.loop = None
        self.client = None
        self.jetstream = None

    takes_chain_head = True

    def subject(self, alert: dict[str, Any]) -> str:
        if alert["action"] == CHAIN_HEAD:
            return f"{self.prefix}.{self.node_token}.audit.head"
        return f"{self.prefix}.{self.node_token}.alert.{alert['priority'].lower()}"

    def deliver(self, alert: dict[str, Any]) -> None:
        [failure] = self.publish_all([(self.subject(alert), json.dumps(alert).encode(), message_id(alert))])
        if failure is not None:
            raise failure

    def publish_all(self, messages: list[tuple[str, bytes, str]]) -> list[DeliveryError | None]:
        """Publishes (subject, payload, message id) all at once, each acknowledged by JetStream;
        for each, None or why it was not. One that failed drops the connection (made again
        by the next call)."""
        import asyncio

        if self.loop is None:
            self.loop = asyncio.new_event_loop()
        try:
            results = self.loop.run_until_complete(asyncio.wait_for(self._publish(messages),
                                                                    self.settings.timeout * 2))
        except Exception as e:  # nats-py's errors have no common base besides Exception
            results = [e] * len(messages)
        failures = [None if r is None else DeliveryError(f"{self.name}: {type(r).__name__}: {r}") for r in results]
        if any(failures):
            self.loop.run_until_complete(self._drop())
        return failures

    async def _publish(self, messages: list[tuple[str, bytes, str]]) -> list[BaseException | None]:
        import asyncio

        import nats

        if self.client is None or self.client.is_closed:
            servers = [u.strip() for u in self.url.split(",") if u.strip()]  # a cluster's servers, comma-separated
            self.client = await nats.connect(servers=servers, allow_reconnect=False,
                                             connect_timeout=self.settings.timeout, max_reconnect_attempts=0)
            self.jetstream = self.client.jetstream(timeout=self.settings.timeout)
            try:
                await self.jetstream.stream_info(self.settings.stream)
            except nats.js.errors.NotFoundError:
                await self.jetstream.add_stream(name=self.settings.stream, subjects=[f"{self.prefix}.>"])
        # published at once, then the acknowledgements awaited (one reply subscription, no task per message)
        acks = [await self.jetstream.publish_async(subject, payload, headers={"Nats-Msg-Id": mid})
                for subject, payload, mid in messages]
        await asyncio.wait(acks, timeout=self.settings.timeout)
        return [ack.exception() if ack.done() and not ack.cancelled() else TimeoutError("no acknowledgement")
                for ack in acks]

    def close(self) -> None:
        if self.loop is not None:
            self.loop.run_until_complete(self._drop())
            self.loop.close()
            self.loop = None

    async def _drop(self) -> None:
        client, self.client = self.client, None
        if client is not None and not client.is_closed:
            try:
                await client.close()
            except Exception:  # already broken: nothing to close cleanly
                pass


def message_id(alert: dict[str, Any]) -> str:
    """The same for the same alert however often it is sent (a retry), another for the next one."""
    key = f"{alert.get('incident')}|{alert['action']}|{alert.get('count', 1)}|{alert['time_ns']}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def sd_escape(value: str) -> str:
    """An SD-PARAM value as RFC 5424 wants it: '"', '\\' and ']' escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


SINKS = {"console": ConsoleSink, "jsonl": JsonlSink, "webhook": WebhookSink, "slack": SlackSink,
         "pagerduty": PagerDutySink, "alertmanager": AlertmanagerSink, "syslog": SyslogSink, "nats": NatsSink}


def make_sink(settings: SinkSettings, node: str) -> Sink:
    return SINKS[settings.type](settings, node)

