"""
The proxy in front of real servers, started by the tests on loopback:
redis-server (redis-cli and the redis client), nginx (curl), sshd
(ssh-keyscan), and HAProxy in front sending PROXY v2.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import threads
from twisted.trial import unittest

from muxtwist import Rule
from muxtwist.actions import HealthCheck, Proxy
from muxtwist.matchers import HTTP1, SSH, Prefix, Redis
from muxtwist.matchers import Any as AnyMatcher
from muxtwist.matchers.proxy_protocol import parse
from tests.test_proxy_support import (
    Peer,
    backend,
    free_port,
    mux,
    need,
    port_open,
    run,
    start_process,
    tempdir,
    until,
    wait,
)


async def start_redis(case: unittest.TestCase) -> int:
    """A throwaway redis-server on loopback; its port."""
    directory = tempdir(case)
    port = free_port()
    proc = start_process(
        case,
        [
            need("redis-server"),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            directory,
            "--logfile",
            os.path.join(directory, "redis.log"),
        ],
    )
    await port_open(port, proc)
    return port


async def start_nginx(case: unittest.TestCase, body: str) -> int:
    """A throwaway nginx on loopback answering every request with ``body``; its port."""
    directory = tempdir(case)
    port = free_port()
    conf = os.path.join(directory, "nginx.conf")
    with open(conf, "w") as f:
        f.write(
            f"""
pid {directory}/nginx.pid;
error_log {directory}/error.log;
worker_processes 1;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "{body}"; }}
    }}
}}
"""
        )
    proc = start_process(case, [need("nginx"), "-c", conf, "-p", directory, "-g", "daemon off;"])
    await port_open(port, proc)
    return port


async def start_sshd(case: unittest.TestCase) -> tuple[int, str]:
    """A throwaway sshd on loopback; its port and the public host key line."""
    directory = tempdir(case)
    key = os.path.join(directory, "host_ed25519")
    out, err, code = await run([need("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", key])
    assert code == 0, err
    os.makedirs("/run/sshd", exist_ok=True)
    port = free_port()
    conf = os.path.join(directory, "sshd_config")
    with open(conf, "w") as f:
        f.write(
            f"HostKey {key}\nListenAddress 127.0.0.1\nPidFile {directory}/sshd.pid\n"
            "UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        )
    proc = start_process(case, [need("/usr/sbin/sshd"), "-D", "-e", "-f", conf, "-p", str(port)])
    await port_open(port, proc)
    with open(key + ".pub") as f:
        return port, f.read().split()[1]


REDIS = Prefix(b"*", b"PING", name="redis")


class RedisTests(unittest.TestCase):
    async def test_redis_cli_and_client_through_two_balanced_backends(self) -> None:
        """redis-cli and the redis client work through the mux, balanced over two health-checked redis-servers."""
        first, second = await start_redis(self), await start_redis(self)
        backends = [f"tcp:host=127.0.0.1:port={first}", f"tcp:host=127.0.0.1:port={second}"]
        proxy = Proxy(
            backends,
            balance="round_robin",
            health_check=HealthCheck(interval=0.1, timeout=1, rise=1, fall=1, send=b"PING\r\n", expect=b"+PONG"),
        )
        port, _ = mux(self, [Rule(HTTP1(), Proxy("tcp:host=127.0.0.1:port=1")), Rule(REDIS, proxy)])
        cli = need("redis-cli")
        out, err, code = await run([cli, "-h", "127.0.0.1", "-p", str(port), "SET", "k", "v1"])
        self.assertEqual((out.strip(), code), (b"OK", 0), err)
        out, err, code = await run([cli, "-h", "127.0.0.1", "-p", str(port), "PING"])
        self.assertEqual(out.strip(), b"PONG")

        def with_client() -> list[Any]:
            import redis

            answers = []
            for _ in range(4):
                r = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
                answers.append(r.ping())
                r.set("big", b"x" * 1_000_000)
                answers.append(len(r.get("big") or b""))
                r.close()
            return answers

        answers = await wait(threads.deferToThread(with_client), 30)
        self.assertEqual(answers, [True, 1_000_000] * 4)
        self.assertEqual(sorted(proxy.stats[b].total for b in backends), [3, 3])
        proxy.doStart()
        self.addCleanup(proxy.doStop)
        await until(lambda: all(b._checks_passed >= 1 for b in proxy.backends))
        self.assertTrue(all(s.healthy for s in proxy.stats.values()))

    async def test_dead_redis_is_marked_down_and_skipped(self) -> None:
        """A redis-server that dies is marked down by the health check and clients go to the other one."""
        alive = await start_redis(self)
        dead_port = free_port()
        backends = [f"tcp:host=127.0.0.1:port={dead_port}", f"tcp:host=127.0.0.1:port={alive}"]
        proxy = Proxy(
            backends,
            health_check=HealthCheck(interval=0.05, timeout=1, rise=2, fall=2, send=b"PING\r\n", expect=b"+PONG"),
        )
        proxy.doStart()
        self.addCleanup(proxy.doStop)
        await until(lambda: not proxy.stats[backends[0]].healthy)
        port, _ = mux(self, [Rule(REDIS, proxy)])
        for _ in range(3):
            out, err, code = await run([need("redis-cli"), "-h", "127.0.0.1", "-p", str(port), "PING"])
            self.assertEqual(out.strip(), b"PONG", err)
        self.assertEqual(proxy.stats[backends[0]].failures, 0)
        self.assertEqual(proxy.stats[backends[1]].total, 3)


class NginxTests(unittest.TestCase):
    async def test_curl_through_the_mux(self) -> None:
        """curl gets nginx's answer through the mux, HTTP and Redis sharing one port."""
        web = await start_nginx(self, "hello from nginx")
        redis_port = await start_redis(self)
        port, _ = mux(
            self,
            [
                Rule(HTTP1(), Proxy(f"tcp:host=127.0.0.1:port={web}")),
                Rule(REDIS, Proxy(f"tcp:host=127.0.0.1:port={redis_port}")),
            ],
        )
        out, err, code = await run([need("curl"), "-sS", "--max-time", "10", f"http://127.0.0.1:{port}/x"])
        self.assertEqual((out, code), (b"hello from nginx", 0), err)
        out, err, code = await run([need("redis-cli"), "-h", "127.0.0.1", "-p", str(port), "PING"])
        self.assertEqual(out.strip(), b"PONG", err)


class SSHTests(unittest.TestCase):
    async def test_ssh_keyscan_through_the_mux(self) -> None:
        """ssh-keyscan reads sshd's host key through the mux, SSH and HTTP sharing one port."""
        sshd, key = await start_sshd(self)
        web = await start_nginx(self, "web")
        to_ssh = Proxy(f"tcp:host=127.0.0.1:port={sshd}")
        port, _ = mux(
            self,
            [Rule(Prefix(b"SSH-"), to_ssh, name="ssh"), Rule(HTTP1(), Proxy(f"tcp:host=127.0.0.1:port={web}"))],
            sniff_timeout=0.3,
            on_timeout=to_ssh,
        )
        out, err, code = await run(
            [need("ssh-keyscan"), "-T", "10", "-t", "ed25519", "-p", str(port), "127.0.0.1"], seconds=30
        )
        self.assertIn(key.encode(), out, err)
        out, err, code = await run([need("curl"), "-sS", "--max-time", "10", f"http://127.0.0.1:{port}/"])
        self.assertEqual(out, b"web", err)


class RecipeTests(unittest.TestCase):
    async def test_http_ssh_and_two_redis_on_one_port(self) -> None:
        """The documented recipe: nginx, sshd and two health-checked Redis servers behind one port, one Redis dying."""
        web, (sshd, key) = await start_nginx(self, "recipe"), await start_sshd(self)
        first, second = await start_redis(self), await start_redis(self)
        ssh = Proxy(f"tcp:host=127.0.0.1:port={sshd}", health_check=HealthCheck(interval=0.1, expect=b"SSH-"))
        redis_backends = [f"tcp:host=127.0.0.1:port={first}", f"tcp:host=127.0.0.1:port={second}"]
        to_redis = Proxy(
            redis_backends,
            balance="least_conn",
            health_check=HealthCheck(interval=0.05, timeout=1, rise=2, fall=2, send=b"PING\r\n", expect=b"+PONG"),
        )
        port, _ = mux(
            self,
            [
                Rule(HTTP1(), Proxy(f"tcp:host=127.0.0.1:port={web}")),
                Rule(SSH(), ssh),
                Rule(Redis(), to_redis),
            ],
            on_timeout=ssh,
            sniff_timeout=0.5,
        )
        cli = [need("redis-cli"), "-h", "127.0.0.1", "-p", str(port)]
        out, err, _ = await run([need("curl"), "-sS", "--max-time", "10", f"http://127.0.0.1:{port}/"])
        self.assertEqual(out, b"recipe", err)
        out, err, _ = await run([need("ssh-keyscan"), "-T", "10", "-t", "ed25519", "-p", str(port), "127.0.0.1"])
        self.assertIn(key.encode(), out, err)
        for _ in range(4):
            out, err, _ = await run([*cli, "PING"])
            self.assertEqual(out.strip(), b"PONG", err)
        self.assertEqual([to_redis.stats[b].total for b in redis_backends], [2, 2])
        # One Redis dies: the health check takes it out, and every client still gets an answer.
        out, err, _ = await run([*cli, "-p", str(first), "SHUTDOWN", "NOSAVE"])
        await until(lambda: not to_redis.stats[redis_backends[0]].healthy)
        for _ in range(3):
            out, err, _ = await run([*cli, "PING"])
            self.assertEqual(out.strip(), b"PONG", err)
        self.assertEqual(to_redis.stats[redis_backends[1]].total, 5)


class HAProxyTests(unittest.TestCase):
    async def test_haproxy_send_proxy_v2_client_address_arrives_intact(self) -> None:
        """HAProxy sends PROXY v2 to the mux, which passes proxy_protocol=2 on: the backend sees curl's addresses."""
        desc, recorded = backend(self, _HTTPRecorder)
        port, _ = mux(
            self,
            [Rule(AnyMatcher(), Proxy(desc, proxy_protocol=2))],
            accept_proxy_protocol=["127.0.0.1/32"],
        )
        directory = tempdir(self)
        front = free_port()
        conf = os.path.join(directory, "haproxy.cfg")
        with open(conf, "w") as f:
            f.write(
                f"""
global
    maxconn 64
defaults
    mode tcp
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend front
    bind 127.0.0.2:{front}
    default_backend mux
backend mux
    server mux 127.0.0.1:{port} send-proxy-v2
"""
            )
        proc = start_process(self, [need("haproxy"), "-db", "-f", conf])
        await port_open(front, proc, host="127.0.0.2")
        out, err, code = await run(
            [need("curl"), "-sS", "--max-time", "10", "--interface", "127.0.0.3", f"http://127.0.0.2:{front}/"]
        )
        self.assertEqual((out, code), (b"ok", 0), err)
        server = recorded.built[0]
        header = parse(bytes(server.received))
        assert header is not None and isinstance(header.source, tuple)
        self.assertEqual(header.version, 2)
        self.assertEqual(header.source[0], "127.0.0.3")
        # The destination curl connected to (HAProxy's frontend), not the mux's own listening address.
        self.assertEqual(header.destination, ("127.0.0.2", front))
        self.assertTrue(bytes(server.received)[header.length :].startswith(b"GET / HTTP/1.1\r\n"))


class _HTTPRecorder(Peer):
    """Records a PROXY header and request, and answers a minimal HTTP response."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if b"\r\n\r\n" in self.received[16:] and self.transport is not None:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            self.transport.loseConnection()
