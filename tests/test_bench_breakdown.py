"""bench.breakdown: the phase each py-spy stack of a connection is counted in, on synthetic stacks."""

from __future__ import annotations

from twisted.trial import unittest

from bench import breakdown

ROOT = "mainLoop (twisted/internet/base.py:1);doPoll (twisted/internet/epollreactor.py:2);"


class PhaseTests(unittest.SynchronousTestCase):
    def test_deepest_marked_frame_decides(self) -> None:
        """A stack counts in the phase of its deepest frame that marks one."""
        stacks = {
            "Port.doRead (twisted/internet/tcp.py:3);socket.accept (socket.py:4)": "accept",
            "Port.doRead (twisted/internet/tcp.py:3);SniffingProtocol.connectionMade (muxtwist/sniffing.py:5)": (
                "sniff"
            ),
            "Connection.doRead (twisted/internet/tcp.py:3);SniffingProtocol.dataReceived (muxtwist/sniffing.py:6);"
            "SniffingProtocol._evaluate (muxtwist/sniffing.py:7);HTTP1.match (muxtwist/matchers/http.py:8)": "sniff",
            "SniffingProtocol._evaluate (muxtwist/sniffing.py:7);SniffingProtocol._hand_off (muxtwist/sniffing.py:9);"
            "Relay.connectionMade (muxtwist/proxy.py:10);Relay._try_next (muxtwist/proxy.py:11);"
            "Proxy._connect (muxtwist/proxy.py:12);connect_socket (muxtwist/_connect.py:13)": "backend connect",
            "_PendingConnect.doWrite (muxtwist/_connect.py:14);_BackendSide.connectionMade (muxtwist/proxy.py:15);"
            "Relay._backend_ready (muxtwist/proxy.py:16);Splice.start (muxtwist/_splice.py:17)": "relay setup",
            "_End.doRead (muxtwist/_splice.py:18);Splice._pump (muxtwist/_splice.py:19);"
            "Splice._flush (muxtwist/_splice.py:20)": "relay",
            "_End.doRead (muxtwist/_splice.py:18);Splice._pump (muxtwist/_splice.py:19);"
            "Splice._ended (muxtwist/_splice.py:21);Connection.connectionLost (twisted/internet/tcp.py:22)": (
                "teardown"
            ),
            "runUntilCurrent (twisted/internet/base.py:23);Deadlines._fire (muxtwist/_deadlines.py:24)": "timers",
            "EPollReactor.doPoll (twisted/internet/epollreactor.py:25)": "reactor and other",
        }
        raw = "\n".join(f"{ROOT}{stack} 2" for stack in stacks)
        for stack, phase in stacks.items():
            total, phases, _ = breakdown.fold(f"{ROOT}{stack} 3")
            self.assertEqual((total, dict(phases)), (3, {phase: 3}), stack)
        total, phases, own = breakdown.fold(raw + "\nnot a stack line\n")
        self.assertEqual(total, 2 * len(stacks))
        self.assertEqual(phases["sniff"], 4)
        self.assertEqual(own["Splice._flush (muxtwist/_splice.py)"], 2)


class KeptSectionTests(unittest.SynchronousTestCase):
    def test_hand_written_section_survives_regeneration(self) -> None:
        """A section between the kept markers of the old page is put back before Machine in the new one."""
        from bench._results import KEPT_BEGIN, KEPT_END, keep_sections

        section = f"{KEPT_BEGIN}\n## Per-connection cost\n\n| a | b |\n{KEPT_END}"
        old = f"# Performance\n\nold figures\n\n{section}\n\n## Machine\n\n- cores: 2\n"
        new = "# Performance\n\nnew figures\n\n## Machine\n\n- cores: 4\n"
        page = keep_sections(old, new)
        self.assertIn("new figures", page)
        self.assertNotIn("old figures", page)
        self.assertEqual(page.count(section), 1)
        self.assertLess(page.index(section), page.index("## Machine"))
        self.assertEqual(keep_sections(page, new), page)
        self.assertEqual(keep_sections("no markers", new), new)
