"""
Smoke tests of the benchmark harness: parsing, aggregation, verdicts and
report writing on synthetic figures, and one real in-process measurement of
about a second. Nothing here asserts on speed.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from twisted.trial import unittest

from bench import _load, _procs, _results, asgi, profile, scenarios
from bench._results import Metric, Scenario, Target

WRK_OUTPUT = """\
Running 1s test @ http://127.0.0.1:8080/
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   120.00us   30.00us   1.20ms   90.00%
  Latency Distribution
     50%  110.00us
     75%  130.00us
     90%  150.00us
     99%    1.10ms
  8000 requests in 1.00s, 700.00KB read
  Socket errors: connect 0, read 8000, write 0, timeout 2
  Non-2xx or 3xx responses: 3
Requests/sec:   7990.12
Transfer/sec:    699.00KB
"""


def _synthetic() -> dict[str, Scenario]:
    s = Scenario("inprocess", "1. In-process", "direct", [Metric("ka_req_s", "keep-alive", "req/s")])
    for direct, sniff in ((100.0, 99.0), (110.0, 90.0), (90.0, 97.0)):
        s.add("direct", {"ka_req_s": direct})
        s.add("muxtwist", {"ka_req_s": sniff})
    s.skip("something", "not built yet")
    return {"inprocess": s}


class ParsingTests(unittest.TestCase):
    def test_wrk_report(self) -> None:
        """wrk's report gives requests/s, the request count, percentiles in ms and the errors that matter."""
        figures = _load.parse_wrk(WRK_OUTPUT)
        self.assertEqual(figures["req_s"], 7990.12)
        self.assertEqual(figures["requests"], 8000)
        self.assertAlmostEqual(figures["p50_ms"], 0.11)
        self.assertAlmostEqual(figures["p99_ms"], 1.1)
        # Read errors are the server closing after Connection: close, not failures.
        self.assertEqual(figures["errors"], 5)

    def test_wrk_without_figures(self) -> None:
        """A wrk report without Requests/sec is a LoadFailed, not a zero."""
        self.assertRaises(_load.LoadFailed, _load.parse_wrk, "unable to connect to 127.0.0.1:1")

    def test_profile_fold(self) -> None:
        """py-spy's collapsed stacks fold into inclusive and self samples per muxtwist function."""
        raw = (
            "run (twisted/internet/base.py:10);dataReceived (/x/muxtwist/sniffing.py:5);"
            "match (/x/muxtwist/matchers/http.py:9) 3\n"
            "run (twisted/internet/base.py:10);dataReceived (/x/muxtwist/sniffing.py:7) 1\n"
            "run (twisted/internet/base.py:12) 6\n"
        )
        total, inclusive, own = profile.fold(raw)
        self.assertEqual(total, 10)
        self.assertEqual(inclusive["dataReceived (muxtwist/sniffing.py)"], 4)
        self.assertEqual(own["dataReceived (muxtwist/sniffing.py)"], 1)
        self.assertEqual(own["match (muxtwist/matchers/http.py)"], 3)


class AggregationTests(unittest.TestCase):
    def test_median_and_ratio(self) -> None:
        """Figures are medians of the runs, and ratios are median over median."""
        s = _synthetic()["inprocess"]
        self.assertEqual(s.median("direct", "ka_req_s"), 100.0)
        self.assertEqual(s.median("muxtwist", "ka_req_s"), 97.0)
        self.assertAlmostEqual(s.ratio("muxtwist", "direct", "ka_req_s") or 0, 0.97)

    def test_targets(self) -> None:
        """A target is met, not met, or not measured when its figures are missing."""
        found = _synthetic()
        met = Target("inprocess", "ka_req_s", "muxtwist", "direct", ">=", 0.95, "t")
        missed = Target("inprocess", "ka_req_s", "muxtwist", "direct", ">=", 0.98, "t")
        absent = Target("proxy", "ka_req_s", "muxtwist", "direct", ">=", 1.0, "t")
        self.assertEqual(_results.evaluate(met, found)[0], "met")
        self.assertEqual(_results.evaluate(missed, found)[0], "not met")
        self.assertEqual(_results.evaluate(absent, found), ("not measured", None))

    def test_write(self) -> None:
        """JSON, Markdown and the docs page are written, saying what was not measured and that it was quick."""
        out = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, out, ignore_errors=True)
        meta = {"quick": True, "runs": 3, "seconds": 1.0, "finished": "2026-01-01T00:00:00", "machine": {"cores": 2}}
        target = Target("inprocess", "ka_req_s", "muxtwist", "direct", ">=", 0.98, "keep-alive >= 0.98x")
        written = _results.write(out / "results", out / "docs", meta, _synthetic(), [target], "python -m bench")
        data = json.loads(written["json"].read_text())
        figures = data["scenarios"]["inprocess"]["contenders"]["muxtwist"]["ka_req_s"]
        self.assertEqual(figures["samples"], [99.0, 90.0, 97.0])
        self.assertEqual(figures["median"], 97.0)
        self.assertEqual(data["targets"][0]["status"], "not met")
        page = written["page"].read_text()
        self.assertIn("Quick run", page)
        self.assertIn("Not measured: something", page)
        self.assertIn("| keep-alive >= 0.98x | 0.97x | **not met** |", page)

    def test_merge_keeps_when_each_scenario_was_measured(self) -> None:
        """Merging a results file keeps the measuring time of a scenario it had itself kept from an earlier run."""
        out = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, out, ignore_errors=True)
        first = {"runs": 3, "seconds": 5.0, "finished": "2026-01-01T10:00:00", "machine": {"cores": 2}}
        written = _results.write(out / "a", None, first, _synthetic(), [], "python -m bench")
        carried = _results.from_json(json.loads(written["json"].read_text()))
        second = {"runs": 3, "seconds": 5.0, "finished": "2026-01-01T12:00:00", "machine": {"cores": 2}}
        written = _results.write(out / "b", None, second, carried, [], "python -m bench")
        again = _results.from_json(json.loads(written["json"].read_text()))
        notes = [n for n in again["inprocess"].notes if n.startswith("Measured earlier")]
        self.assertEqual(len(notes), 1)
        self.assertIn("2026-01-01T10:00:00", notes[0])


class ProcessTests(unittest.TestCase):
    def test_cpu_seconds_counts_the_tree(self) -> None:
        """CPU seconds of a process tree are read from /proc and never go down."""
        first = _procs.cpu_seconds([_procs.os.getpid()])
        sum(range(200_000))
        self.assertGreaterEqual(_procs.cpu_seconds([_procs.os.getpid()]), first)

    def test_one_measurement(self) -> None:
        """One interleaved keep-alive measurement of the responder, direct and sniffing, gives figures for both."""
        workdir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
        ctx = scenarios.Context(
            workdir=workdir, runs=1, seconds=1, idle_connections=10, server_cpu=[], load_cpu=[], log=lambda m: None
        )
        ctx.connections = 4
        ctx.warmup = False
        scenario = Scenario("inprocess", "t", "direct", scenarios.INPROCESS_METRICS)
        with _procs.Servers(workdir) as servers:
            direct, direct_port = scenarios.start_python(ctx, servers, "responder", "responder")
            sniff, sniff_port = scenarios.start_python(ctx, servers, "responder-sniff", "responder-sniff")
            contenders = [
                scenarios.Contender("direct", direct_port, measured=[direct]),
                scenarios.Contender("sniffing", sniff_port, measured=[sniff]),
            ]
            scenarios._interleave(
                ctx, scenario, contenders, [("ka", lambda c: scenarios._wrk(ctx, c, close=False, connections=4))]
            )
            pids = [direct.pid, sniff.pid]
        self.assertEqual(scenario.notes, [])
        for name in ("direct", "sniffing"):
            self.assertGreater(scenario.median(name, "ka_req_s") or 0, 0)
            self.assertEqual(scenario.median(name, "ka_errors"), 0)
        for pid in pids:
            self.assertFalse(Path(f"/proc/{pid}/stat").exists() and _alive(pid))

    def test_idle_connections_open_a_batch_at_a_time(self) -> None:
        """The traced proxied scale run opens a batch once the server linked the one before, and gives a heap figure."""
        import socket

        workdir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
        ctx = scenarios.Context(
            workdir=workdir, runs=1, seconds=1, idle_connections=10, server_cpu=[], load_cpu=[], log=lambda m: None
        )
        self.patch(scenarios, "IDLE_BATCH", 40)
        linked = [0]
        ask = scenarios._ControlClient.ask

        def asking(client: scenarios._ControlClient, command: str) -> Any:
            answer = ask(client, command)
            if isinstance(answer, dict) and "linked" in answer:
                linked[0] = answer["linked"]
            return answer

        # Per connection opened: how many the server had linked when it was opened.
        behind: list[int] = []
        connect = socket.create_connection

        def connecting(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
            behind.append(linked[0])
            return connect(address, *args, **kwargs)

        self.patch(scenarios._ControlClient, "ask", asking)
        with _procs.Servers(workdir) as servers:
            _, sink_port = scenarios.start_python(ctx, servers, "scale-sink", "sink")
            self.patch(socket, "create_connection", connecting)
            figures, top = scenarios._scale_once(ctx, "scale-proxy", True, sink_port, 100)
        # The first is the control connection; then connection i (from 0) is opened with i // 40 batches linked.
        self.assertEqual(len(behind), 101)
        self.assertEqual([b for i, b in enumerate(behind[1:]) if b < i // 40 * 40], [])
        self.assertGreater(figures["heap_per_conn"], 0)
        self.assertTrue(top)

    def test_asgi_mux_server_starts(self) -> None:
        """The ASGI scenario's muxtwist server (a Proxy rule, ASGI on the asyncio reactor) starts and answers HTTP."""
        workdir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
        port, sink = _procs.free_port(), _procs.free_port()
        with _procs.Servers(workdir) as servers:
            servers.start("asgi-mux", [sys.executable, "-m", "bench.asgi", "mux", str(port), str(sink)], port=port)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
                self.assertEqual(response.read(), asgi.BODY)


def _alive(pid: int) -> bool:
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


class InstructionsLoadTests(unittest.SynchronousTestCase):
    """bench.instructions' load: every request on its own connection, every answer checked."""

    def _server(self, answer: bytes) -> tuple[int, list[int]]:
        import socket
        import threading

        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen(64)
        listening.settimeout(0.1)
        served: list[int] = []
        stopping = threading.Event()

        def serve() -> None:
            while not stopping.is_set():
                try:
                    conn, _ = listening.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                conn.settimeout(5)
                with conn:
                    conn.recv(4096)
                    conn.sendall(answer)
                    served.append(1)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()

        def stop() -> None:
            stopping.set()
            thread.join(5)
            listening.close()

        self.addCleanup(stop)
        return listening.getsockname()[1], served

    def test_count_connections_are_made_and_answered(self) -> None:
        """load() makes exactly count connections, some at once, and returns once each was answered and closed."""
        from bench.instructions import load

        port, served = self._server(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        load(port, 25, 4)
        self.assertEqual(len(served), 25)

    def test_an_answer_that_is_not_200_stops_the_measurement(self) -> None:
        """A server that answers anything but 200 is an error, not a figure."""
        from bench.instructions import load

        port, _ = self._server(b"HTTP/1.1 503 Busy\r\n\r\n")
        with self.assertRaises(RuntimeError):
            load(port, 3, 1)
