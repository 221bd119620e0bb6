"""
Summing the statuses of a ``--workers`` pool when workers die, come back or
are replaced: the totals, bytes, outcomes, errors, failures and limit
rejections of ``/status.json`` (and the page built from it) never go back,
as ``/metrics``' counters do not; gauges and health are the answering
workers' only. In memory (plain dicts), over real UNIX sockets, and in a
real ``twistd muxtwist --workers 2`` whose worker is killed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial import unittest

from muxtwist._admin_merge import CounterMemory, StatusMemory, merge_status
from muxtwist.admin import admin_site, render_page
from muxtwist.metrics import Metrics
from tests.test_admin_page import until
from tests.test_workers import Pool, get, sample


def part(
    slot: int,
    handed_off: int,
    live: int = 0,
    backends: dict[str, bool] | None = None,
    limits: int = 0,
    time: float = 1.0,
) -> dict[str, Any]:
    """One worker's ``/worker/status.json``: ``handed_off`` ended connections, ``live`` open, bytes 10 each."""
    rows = []
    for name, healthy in (backends if backends is not None else {"b1": True}).items():
        rows.append(
            {
                "rule": "r",
                "backend": name,
                "live": live,
                "total": handed_off + live,
                "bytes_in": 10 * handed_off,
                "bytes_out": 20 * handed_off,
                "failures": handed_off,
                "errors": {"refused": handed_off},
                "checked": True,
                "healthy": healthy,
                "since": 1.0,
                "last_check": "passed" if healthy else "refused",
                "last_check_at": 1.0,
                "skipped_until": None,
            }
        )
    rule = {
        "name": "r",
        "live": live,
        "total": handed_off + live,
        "bytes_in": 10 * handed_off,
        "bytes_out": 20 * handed_off,
        "outcomes": {"handed_off": handed_off},
    }
    listener = {
        "endpoint": "tcp:1",
        "live": live,
        "sniffing": live,
        "total": handed_off + live,
        "bytes_in": 10 * handed_off,
        "bytes_out": 20 * handed_off,
        "outcomes": {"handed_off": handed_off},
        "rules": [rule],
        "backends": rows,
    }
    return {
        "time": time,
        "workers": [{"slot": slot, "pid": 100 + slot, "answered": True}],
        "listeners": [listener],
        "limit_rejections": {"emfile": limits},
    }


def merged(memory: StatusMemory, answers: list[tuple[str, dict[str, Any] | None, str | None]]) -> dict[str, Any]:
    """What the aggregating admin site shows for one gathering of ``answers``."""
    answering, kept = memory.parts(answers)
    return merge_status([p for _, p in answering], now=10.0, kept=kept)


def counts(status: dict[str, Any]) -> dict[str, Any]:
    """The summed numbers of a merged status that must never go back, and its live ones."""
    (listener,) = status["listeners"]
    (rule,) = listener["rules"]
    return {
        "handed_off": listener["outcomes"].get("handed_off", 0),
        "total": listener["total"],
        "bytes_in": listener["bytes_in"],
        "rule_handed_off": rule["outcomes"].get("handed_off", 0),
        "rule_bytes_out": rule["bytes_out"],
        "limits": status["limit_rejections"].get("emfile", 0),
        "live": listener["live"],
        "sniffing": listener["sniffing"],
        "rule_live": rule["live"],
    }


def backend(status: dict[str, Any], name: str) -> dict[str, Any] | None:
    rows = [b for b in status["listeners"][0]["backends"] if b["backend"] == name]
    return rows[0] if rows else None


class StatusMemoryTests(unittest.SynchronousTestCase):
    """StatusMemory and merge_status on plain dicts."""

    def test_a_dead_worker_counts_with_its_last_answer_but_not_its_live_connections(self) -> None:
        """A worker that stops answering keeps its totals, bytes, outcomes and limit rejections, not its gauges."""
        memory = StatusMemory()
        both = merged(memory, [("worker-0", part(0, 5, live=2, limits=1), "a"), ("worker-1", part(1, 7, live=3), "b")])
        self.assertEqual(counts(both)["handed_off"], 12)
        self.assertEqual(counts(both)["live"], 5)
        dead = merged(memory, [("worker-0", part(0, 9, live=1, limits=2), "a"), ("worker-1", None, None)])
        self.assertEqual(
            counts(dead),
            {
                "handed_off": 16,
                "total": 9 + 1 + 7 + 3,  # the dead worker's total as it last answered
                "bytes_in": 160,
                "rule_handed_off": 16,
                "rule_bytes_out": 320,
                "limits": 2,
                "live": 1,
                "sniffing": 1,
                "rule_live": 1,
            },
        )
        row = backend(dead, "b1")
        assert row is not None
        self.assertEqual((row["failures"], row["errors"], row["live"]), (16, {"refused": 16}, 1))
        self.assertEqual((row["workers"], row["healthy_in"]), (1, 1))

    def test_a_worker_missing_then_answering_again_is_counted_once(self) -> None:
        """The same worker answering again after a missed gathering counts with its new answer only, not twice."""
        memory = StatusMemory()
        merged(memory, [("worker-0", part(0, 5), "a"), ("worker-1", part(1, 7), "b")])
        self.assertEqual(
            counts(merged(memory, [("worker-0", part(0, 5), "a"), ("worker-1", None, None)]))["handed_off"], 12
        )
        again = merged(memory, [("worker-0", part(0, 5), "a"), ("worker-1", part(1, 8, time=2.0), "b")])
        self.assertEqual(counts(again)["handed_off"], 13)
        self.assertEqual(counts(again)["limits"], 0)

    def test_a_replaced_workers_counts_stay_added_for_good(self) -> None:
        """Once a new worker answers in a slot, the old one's last counts stay added to the new one's, every time."""
        memory = StatusMemory()
        merged(memory, [("worker-0", part(0, 5), "a"), ("worker-1", part(1, 7, limits=3), "b")])
        merged(memory, [("worker-0", part(0, 5), "a"), ("worker-1", None, None)])
        for new_count in (0, 1, 1, 4):
            replaced = merged(memory, [("worker-0", part(0, 5), "a"), ("worker-1", part(1, new_count), "c")])
            self.assertEqual(counts(replaced)["handed_off"], 5 + 7 + new_count)
            self.assertEqual(counts(replaced)["limits"], 3)
        # Replaced again: both retired workers' counts stay, folded into one record.
        merged(memory, [("worker-0", part(0, 5), "a"), ("worker-1", part(1, 2), "d")])
        self.assertEqual(len(memory.retired["listeners"]), 1)
        self.assertEqual(len(memory.retired["listeners"][0]["rules"]), 1)
        final = merged(memory, [("worker-0", part(0, 6), "a"), ("worker-1", part(1, 2), "d")])
        self.assertEqual(counts(final)["handed_off"], 6 + 7 + 4 + 2)
        self.assertEqual(counts(final)["bytes_in"], 10 * (6 + 7 + 4 + 2))

    def test_a_late_answer_from_a_replaced_worker_is_ignored(self) -> None:
        """An answer from an instance already replaced adds nothing and its slot shows as not answering."""
        memory = StatusMemory()
        merged(memory, [("worker-0", part(0, 5), "a"), ("worker-1", part(1, 7), "b")])
        merged(memory, [("worker-0", part(0, 5), "a"), ("worker-1", part(1, 1), "c")])
        answering, kept = memory.parts([("worker-0", part(0, 5), "a"), ("worker-1", part(1, 9), "b")])
        self.assertEqual([name for name, _ in answering], ["worker-0"])
        late = merge_status([p for _, p in answering], now=10.0, kept=kept)
        self.assertEqual(counts(late)["handed_off"], 5 + 7 + 1)
        self.assertEqual(memory.last["worker-1"][0], "c")

    def test_retired_counts_add_only_to_backends_answering_workers_report(self) -> None:
        """A backend only a retired worker knew is not shown; the others get its counts but keep their health."""
        memory = StatusMemory()
        merged(memory, [("worker-0", part(0, 5, backends={"b1": True, "b2": True}), "a")])
        after = merged(memory, [("worker-0", part(0, 1, backends={"b1": False}), "c")])
        self.assertIsNone(backend(after, "b2"))
        row = backend(after, "b1")
        assert row is not None
        self.assertEqual((row["failures"], row["bytes_in"], row["errors"]), (6, 60, {"refused": 6}))
        self.assertEqual((row["healthy"], row["workers"], row["healthy_in"]), (False, 1, 0))
        # With no worker answering, no backend row at all: health is only ever an answering worker's.
        gone = merged(memory, [("worker-0", None, None)])
        self.assertEqual(gone["listeners"][0]["backends"], [])
        self.assertEqual(counts(gone)["handed_off"], 6)
        self.assertIn("tcp:1", render_page(gone).decode())

    def test_out_of_order_answers_of_one_worker_keep_its_newest_counts(self) -> None:
        """An older answer of the same worker gathered after a newer one does not lower what is kept for it."""
        memory = StatusMemory()
        memory.parts([("worker-0", part(0, 9, time=5.0), "a")])
        memory.parts([("worker-0", part(0, 4, time=3.0), "a")])
        self.assertEqual(counts(merged(memory, [("worker-0", None, None)]))["handed_off"], 9)


class CounterMemoryTests(unittest.SynchronousTestCase):
    """CounterMemory, the same for /metrics."""

    def test_a_replaced_worker_is_retired_once_when_its_successor_names_no_instance(self) -> None:
        """A worker replaced by one that sends no instance header is added once, not again at each scrape."""
        memory = CounterMemory()

        def text(n: int) -> bytes:
            metrics = Metrics()
            for _ in range(n):
                metrics.limit_rejected("emfile")
            from prometheus_client.exposition import generate_latest

            return generate_latest(metrics.registry)

        def emfile(answers: list[tuple[str, bytes | None, str | None]]) -> float:
            from muxtwist._admin_merge import exposition, merge_families

            body = exposition(merge_families(memory.parts(answers))).decode()
            for family in text_string_to_metric_families(body):
                for s in family.samples:
                    if s.name == "muxtwist_limit_rejections_total" and s.labels.get("limit") == "emfile":
                        return s.value
            raise AssertionError("no emfile sample")

        self.assertEqual(emfile([("worker-0", text(5), "a")]), 5)
        self.assertEqual(emfile([("worker-0", text(1), None)]), 6)
        self.assertEqual(emfile([("worker-0", text(1), None)]), 6)


class StatusOverSocketsTests(unittest.TestCase):
    """The status resources of an aggregating admin site, asking real admin sites over UNIX sockets."""

    async def test_status_and_page_counts_never_go_back_when_a_worker_dies_or_restarts(self) -> None:
        """A worker's limit rejections stay in /status.json and the page while it is gone and after it is replaced."""
        from twisted.internet import reactor

        from muxtwist.admin import StatsPage, StatusResource, WorkerPeers

        directory = tempfile.mkdtemp(prefix="muxtwist-test-peers-")
        self.addCleanup(shutil.rmtree, directory, True)
        sockets = {}
        for slot, n in ((0, 5), (1, 3)):
            metrics = Metrics()
            for _ in range(n):
                metrics.limit_rejected("emfile")
            path = os.path.join(directory, f"worker-{slot}.sock")
            sockets[slot] = reactor.listenUNIX(path, admin_site(registry=metrics))  # type: ignore[attr-defined]
            self.addCleanup(sockets[slot].stopListening)
        peers = WorkerPeers(directory, expected=lambda: 2)
        resource = StatusResource(None, Metrics(), peers)
        page = StatsPage(None, Metrics(), peers)

        async def emfile(on: Any = resource) -> int:
            rejections: int = (await on.gathered_status())["limit_rejections"]["emfile"]
            return rejections

        self.assertEqual(await emfile(), 8)
        await sockets[0].stopListening()  # worker 0 dies: its 5 stay counted
        self.assertEqual(await emfile(), 8)
        self.assertEqual(await emfile(page), 8)  # the page shares what /status.json saw
        fresh = Metrics()
        fresh.limit_rejected("emfile")
        restarted = reactor.listenUNIX(os.path.join(directory, "worker-0.sock"), admin_site(registry=fresh))  # type: ignore[attr-defined]
        self.addCleanup(restarted.stopListening)
        self.assertEqual(await emfile(), 9)  # the new worker 0 counts from 0, on top of the old one's 5
        self.assertEqual(await emfile(), 9)
        self.assertEqual(await emfile(page), 9)

    async def test_a_worker_answering_no_status_shows_as_not_answering(self) -> None:
        """A worker that answers something other than a JSON status counts as not answering; the others are summed."""
        from twisted.internet import reactor
        from twisted.web.resource import Resource
        from twisted.web.server import Site
        from twisted.web.static import Data

        from muxtwist.admin import StatusResource, WorkerPeers

        directory = tempfile.mkdtemp(prefix="muxtwist-test-peers-")
        self.addCleanup(shutil.rmtree, directory, True)
        metrics = Metrics()
        metrics.limit_rejected("emfile")
        good = reactor.listenUNIX(os.path.join(directory, "worker-0.sock"), admin_site(registry=metrics))  # type: ignore[attr-defined]
        self.addCleanup(good.stopListening)
        root, worker = Resource(), Resource()
        worker.putChild(b"status.json", Data(b"<html>not json", "text/html"))
        root.putChild(b"worker", worker)
        bad = reactor.listenUNIX(os.path.join(directory, "worker-1.sock"), Site(root))  # type: ignore[attr-defined]
        self.addCleanup(bad.stopListening)
        merged = await StatusResource(None, Metrics(), WorkerPeers(directory, expected=lambda: 2)).gathered_status()
        self.assertEqual([(w["slot"], w["answered"]) for w in merged["workers"]], [(0, True), (1, False)])
        self.assertEqual(merged["limit_rejections"]["emfile"], 1)
        self.flushLoggedErrors()


def handed_off_in_status(pool: Pool) -> float:
    (listener,) = pool.status()["listeners"]
    echo = next(r for r in listener["rules"] if r["name"] == "echo")
    return float(echo["outcomes"].get("handed_off", 0))


def handed_off_in_metrics(pool: Pool) -> float:
    text = get(pool.admin, "/metrics").decode()
    return sample(text, 'muxtwist_connections_total{outcome="handed_off",rule="echo"}')


def echo_once(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"hello\n")
        if s.recv(100) != b"hello\n":
            raise AssertionError("no echo")


class KilledWorkerTests(unittest.TestCase):
    """A real ``twistd muxtwist --workers 2 --admin`` one of whose workers is killed with SIGKILL."""

    def test_status_counts_equal_metrics_after_a_worker_is_killed_and_replaced(self) -> None:
        """After a worker is killed and started again, /status.json counts as many ended connections as /metrics."""
        pool = Pool(self)
        until(lambda: len(pool.answering()) == 2, 30, "both workers answering the admin site")
        for _ in range(12):
            echo_once(pool.port)
        # Both ends learn each worker's counts (the kernel spread the 12 over the workers).
        until(lambda: handed_off_in_status(pool) == 12, 15, "the 12 connections to end")
        self.assertEqual(handed_off_in_metrics(pool), 12)
        per_worker = {w["pid"]: w["total"] for w in pool.answering()}
        victim = max(per_worker, key=lambda pid: per_worker[pid])
        self.assertGreater(per_worker[victim], 0, per_worker)
        os.kill(victim, signal.SIGKILL)

        def replaced() -> bool:
            pids = {w["pid"] for w in pool.answering()}
            return len(pids) == 2 and victim not in pids

        until(replaced, 30, "a new worker to answer in the killed one's slot")
        for _ in range(4):
            echo_once(pool.port)
        until(lambda: handed_off_in_metrics(pool) == 16, 15, "/metrics to count all 16 connections")
        self.assertEqual(handed_off_in_status(pool), 16)
        self.assertEqual(handed_off_in_status(pool), handed_off_in_metrics(pool))
