"""
Tests for muxtwist._textlog: twistd's text log lines, formatted for less,
written where twistd would write them.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import LogLevel, LogPublisher, eventAsJSON, eventFromJSON, formatEventAsClassicLogText
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions
from twisted.trial import unittest

from muxtwist import _report
from muxtwist._textlog import ClassicText, text_log_observer, use_twistd_options
from muxtwist.interfaces import ConnectionEnd

# Times from 2001 to 2033, with fractions: seconds change between events.
_times = st.one_of(st.none(), st.floats(min_value=1e9, max_value=2e9, allow_nan=False))
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


def _connection_end(end: ConnectionEnd, when: float | None) -> dict[str, Any]:
    """The event ConnectionLog emits for ``end``, as an observer of the sniffer's logger sees it."""
    events: list[dict[str, Any]] = []
    publisher = LogPublisher(events.append)
    logger = _report.log
    original = logger.observer
    logger.observer = publisher
    try:
        _report.ConnectionLog().connection_end(end)
    finally:
        logger.observer = original
    (event,) = events
    event["log_time"] = when
    return event


_ENDS = st.tuples(_times, _text, _text, st.integers(0, 1 << 40), st.booleans())

#: What an observer ahead of the file might do to a connection_end event's fields.
_TAMPER = st.one_of(
    st.none(),
    st.tuples(
        st.sampled_from(["peer", "rule", "local_port", "sniff_time", "bytes_in", "how", "duration"]),
        st.one_of(st.just("[masked]"), st.none(), st.integers(), st.floats(allow_nan=True), st.just(object)),
    ),
    st.tuples(st.sampled_from(["peer", "outcome", "sniff_time", "how"]), st.just(KeyError)),
)


class ClassicTextTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(_ENDS, _TAMPER), min_size=1, max_size=6))
    def test_connection_end_lines_are_twisteds(self, ends: list[tuple[Any, Any]]) -> None:
        """
        A connection_end event gives, byte for byte, the line Twisted's text
        observer writes, second after second, also after an observer before
        it changed or removed a field.
        """
        formatter = ClassicText()
        for (when, peer, rule, count, transparent), tamper in ends:
            end = ConnectionEnd(
                rule=rule,
                outcome="handed_off",
                sniff_time=0.25,
                sniffed_in=count,
                sniffed_out=0,
                transparent=transparent,
                peer=peer,
                local_port=3000,
                duration=1.5,
            )
            event = _connection_end(end, when)
            if tamper is not None:
                field, value = tamper
                if value is KeyError:
                    del event[field]
                else:
                    event[field] = value
            self.assertEqual(formatter(event), formatEventAsClassicLogText(event))

    def test_masked_peer_is_written_masked(self) -> None:
        """An observer that replaces the peer before the file sees it gets its replacement in the line."""
        end = ConnectionEnd(
            rule="web", outcome="handed_off", sniff_time=0.1, sniffed_in=1, sniffed_out=0, peer="192.0.2.1:5"
        )
        event = dict(_connection_end(end, 1.7e9), peer="[masked]")
        text = ClassicText()(event)
        assert text is not None
        self.assertIn("connection [masked] -> port", text)
        self.assertNotIn("192.0.2.1", text)

    @settings(max_examples=200, deadline=None)
    @given(_times, _text, st.sampled_from([None, "sys", "a\nb"]), st.sampled_from(list(LogLevel.iterconstants())))
    def test_other_events_are_twisteds(self, when: float | None, value: str, system: str | None, level: Any) -> None:
        """Any other event, with or without a system, in any level, is formatted exactly as Twisted does."""
        event: dict[str, Any] = {
            "log_format": "value {value!r} and {value}",
            "value": value,
            "log_time": when,
            "log_level": level,
            "log_namespace": "some.where",
        }
        if system is not None:
            event["log_system"] = system
        self.assertEqual(ClassicText()(event), formatEventAsClassicLogText(event))

    def test_failures_flattened_events_and_odd_times_are_twisteds(self) -> None:
        """A connection_end with a failure, one flattened (as read back from JSON), times before 1970: as Twisted."""
        end = ConnectionEnd(rule="web", outcome="handed_off", sniff_time=0.1, sniffed_in=1, sniffed_out=0, peer="p")
        failed = dict(_connection_end(end, 1.7e9), log_failure=Failure(ZeroDivisionError("division by zero")))
        flattened = dict(eventFromJSON(eventAsJSON(_connection_end(end, 1.7e9))))
        flattened["peer"] = "changed after flattening"
        events: list[dict[str, Any]] = [failed, flattened, {"log_time": 1.7e9, "message": ("legacy",)}]
        events += [_connection_end(end, when) for when in (-1.5, -0.0000001, 0.0, -86400.9999996)]
        for event in events:
            self.assertEqual(ClassicText()(event), formatEventAsClassicLogText(event), event)


class _Refuses:
    """A field whose str() raises."""

    def __str__(self) -> str:
        raise ValueError("no str")


class _Interrupts:
    """A field whose formatting raises what is not an Exception."""

    def __format__(self, spec: str) -> str:
        raise KeyboardInterrupt


class _FormatsOtherwise(str):
    """A str whose format() and str() disagree."""

    def __format__(self, spec: str) -> str:
        return "formatted"


class _Liar(str):
    """A format that claims to equal every other."""

    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = str.__hash__


class OddEventTests(unittest.TestCase):
    def test_odd_events_are_twisteds(self) -> None:
        """Odd systems, formats, fields and times (from observers or other code) give Twisted's text exactly."""
        from fractions import Fraction

        end = ConnectionEnd(rule="web", outcome="handed_off", sniff_time=0.1, sniffed_in=1, sniffed_out=0, peer="p")
        base = _connection_end(end, 1.7e9)
        variants: list[dict[str, Any]] = [
            dict(base, log_system=_Refuses()),
            dict(base, log_system=_FormatsOtherwise("thread-1")),
            dict(base, peer=_Interrupts()),
            dict(base, bytes_in=10**5000),
            dict(base, log_format=_Liar("peer was {peer}")),
            dict(base, log_time=Fraction(3400000001, 2)),
            dict(base, log_namespace=_FormatsOtherwise("ns")),
        ]
        for event in variants:
            self.assertEqual(_outcome(ClassicText(), event), _outcome(formatEventAsClassicLogText, event))


def _outcome(formatter: Any, event: dict[str, Any]) -> object:
    """What ``formatter`` makes of ``event``: its text, or the type of what it raised."""
    try:
        text: object = formatter(event)
    except Exception as e:
        return type(e)
    return text


class TwistdLogFileTests(unittest.TestCase):
    def _observe(self, **options: Any) -> Any:
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        use_twistd_options(options)
        self.addCleanup(use_twistd_options, {})
        return text_log_observer()

    def test_log_file_is_twistds(self) -> None:
        """With --logfile the lines go to that file, a rotating twistd log file."""
        path = os.path.abspath(self.mktemp())
        observer = self._observe(logfile=path)
        self.addCleanup(observer._outFile.close)
        observer({"log_format": "hello {who}", "who": "there", "log_time": 1.7e9, "log_namespace": "t"})
        with open(path) as f:
            self.assertRegex(f.read(), r"^\S+ \[t#-\] hello there\n$")
        self.assertTrue(hasattr(observer._outFile, "rotate"))

    def test_foreground_without_a_file_writes_standard_output(self) -> None:
        """-n without --logfile, and -l - in the foreground, write standard output."""
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        for options in ({"nodaemon": True}, {"nodaemon": True, "logfile": "-"}):
            self._observe(**options)({"log_format": "x", "log_time": 1.7e9})
        self.assertEqual(out.getvalue().count(" x\n"), 2)

    def test_daemon_cannot_log_to_standard_output(self) -> None:
        """-l - in daemon mode stops twistd with twistd's own message."""
        with self.assertRaises(SystemExit) as raised:
            self._observe(logfile="-")
        self.assertEqual(str(raised.exception), "Daemons cannot log to stdout, exiting!")

    def test_daemon_default_file(self) -> None:
        """A daemon with no --logfile writes twistd.log in its directory; so does --debug (-b) without -n, as twistd."""
        for options in ({}, {"debug": True}):
            folder = os.path.abspath(self.mktemp())
            os.makedirs(folder)
            self.addCleanup(os.chdir, os.getcwd())
            os.chdir(folder)
            observer = self._observe(**options)
            self.addCleanup(observer._outFile.close)
            self.assertTrue(os.path.exists(os.path.join(folder, "twistd.log")), options)

    def test_usr1_handler_left_alone_when_taken(self) -> None:
        """A SIGUSR1 handler already installed is kept, as twistd keeps it."""

        def mine(signum: int, frame: object) -> None:
            pass

        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        signal.signal(signal.SIGUSR1, mine)
        observer = self._observe(logfile=os.path.abspath(self.mktemp()))
        self.addCleanup(observer._outFile.close)
        self.assertIs(signal.getsignal(signal.SIGUSR1), mine)


class ToParentTests(unittest.TestCase):
    def _pipe(self, clock: Any) -> tuple[int, Any]:
        from muxtwist import _worker_log

        self.patch(_worker_log, "TO_PARENT_LIMIT", 256 * 1024)
        read_end, out = _pipe_to_parent(self, clock)
        return read_end, out

    def _count(self, records: list[bytes], line: bytes) -> tuple[int, int]:
        """The records equal to ``line``, and the count the dropped-events notes give; every other is neither."""
        kept = sum(1 for r in records if r == line)
        notes = [r for r in records if b"log events dropped" in r]
        dropped = sum(int(n.split(b"] ")[1].split(b" ")[0]) for n in notes)
        self.assertEqual(kept + len(notes), len(records), records[:3])
        return kept, dropped

    def test_a_parent_that_does_not_read_costs_lines_not_time(self) -> None:
        """Into a pipe nobody reads, writes never block; past the limit events are dropped, then counted."""
        from twisted.internet.task import Clock

        from muxtwist._worker_log import RECORD_END

        clock = Clock()
        read_end, out = self._pipe(clock)
        line = b"x" * 99 + b"\n"
        for _ in range(5000):  # 500 KB: the pipe's 64 KiB, the held 256 KiB, and more
            self.assertEqual(out.write(line), len(line))
        received = b""
        for _ in range(100):
            clock.advance(0.05)
            received += _read_all(read_end)
            if not out._unsent and not out._dropped:
                break
        records = received.split(RECORD_END)
        self.assertEqual(records.pop(), b"")
        kept, dropped = self._count(records, line)
        self.assertGreater(dropped, 0)
        self.assertEqual(kept + dropped, 5000)

    def test_held_events_go_out_with_the_next_one(self) -> None:
        """Once the parent reads again, the next event written takes the held ones with it, not a timer."""
        from twisted.internet.task import Clock

        from muxtwist._worker_log import RECORD_END

        read_end, out = self._pipe(Clock())
        line = b"y" * 99 + b"\n"
        for _ in range(1000):
            out.write(line)
        self.assertTrue(out._unsent)
        received = b""
        for _ in range(1000):
            received += _read_all(read_end)
            out.write(line)
        received += _read_all(read_end)
        self.assertFalse(out._unsent)
        records = received.split(RECORD_END)
        self.assertEqual(records.pop(), b"")
        self.assertEqual(self._count(records, line), (2000, 0))

    def test_a_separator_inside_an_event_is_escaped(self) -> None:
        """An event holding the record separator is one record, the separator written as text."""
        from twisted.internet.task import Clock

        from muxtwist._worker_log import RECORD_END

        read_end, out = self._pipe(Clock())
        out.write(b"client said: abc" + RECORD_END + b"def\n")
        self.assertEqual(_read_all(read_end), b"client said: abc\\x1edef\n" + RECORD_END)

    def test_threads_may_write_while_events_are_held(self) -> None:
        """Several threads writing while the pipe is full lose no event to an error, and every record is whole."""
        import threading

        from muxtwist._worker_log import RECORD_END

        read_end, out = self._pipe(_ThreadClock())
        line = b"z" * 99 + b"\n"
        errors: list[BaseException] = []

        def writer() -> None:
            try:
                for _ in range(2000):
                    out.write(line)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=writer) for _ in range(3)]
        for t in threads:
            t.start()
        received = b""
        for _ in range(2000):
            received += _read_all(read_end)
            out._again(out._retry)
            if not any(t.is_alive() for t in threads):
                break
        for t in threads:
            t.join(10)
        for _ in range(200):
            out._again(out._retry)
            received += _read_all(read_end)
            if not out._unsent and not out._dropped:
                break
        self.assertEqual(errors, [])
        records = received.split(RECORD_END)
        self.assertEqual(records.pop(), b"")
        kept, dropped = self._count(records, line)
        self.assertEqual(kept + dropped, 6000)


def _pipe_to_parent(test: unittest.TestCase, clock: Any = None, size: int | None = None) -> tuple[int, Any]:
    """
    A worker's ToParent on a pipe of ``size`` bytes (the default: the
    system's), and the pipe's read end. At cleanup the read end closes
    first, then the ToParent (its last writes find no reader: they never
    wait for one a failed test left), then its descriptors. A ToParent left
    unclosed would close when the garbage collector finds it, in a later
    test, and make blocking whatever descriptor took its number by then.
    """
    import atexit
    import fcntl

    from twisted.internet.task import Clock

    from muxtwist import _worker_log

    read_end, write_end = os.pipe()
    if size is not None:
        fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    os.set_blocking(read_end, False)
    out = _worker_log.ToParent(write_end, reactor=clock if clock is not None else Clock())
    atexit.unregister(out.close)  # the cleanups close it
    test.addCleanup(os.close, out._fd)
    test.addCleanup(os.close, write_end)
    test.addCleanup(out.close)
    test.addCleanup(os.close, read_end)
    return read_end, out


def _read_all(read_end: int) -> bytes:
    """What the pipe holds now."""
    received = b""
    try:
        while chunk := os.read(read_end, 1 << 16):
            received += chunk
    except BlockingIOError:
        pass
    return received


class SignalHandlerWriteTests(unittest.TestCase):
    """A signal handler that logs in a worker, which Python runs between any two bytecodes of the thread writing."""

    def test_an_event_from_a_handler_mid_write_follows_the_event_being_written(self) -> None:
        """An event written while an event is being written (as a signal handler does) neither hangs nor cuts it."""
        import threading

        from muxtwist._worker_log import RECORD_END

        read_end, out = _pipe_to_parent(self)
        real_write = os.write
        handled: list[bytes] = []

        def write(fd: int, data: Any) -> int:
            if fd == out._fd and not handled:
                handled.append(bytes(data))
                out.write(b"from the handler\n")  # what a handler logging at this bytecode does
            return real_write(fd, data)

        self.patch(os, "write", write)
        done = threading.Event()
        writer = threading.Thread(target=lambda: (out.write(b"being written\n"), done.set()), daemon=True)
        writer.start()
        writer.join(10)
        if not done.is_set():
            self.fail("the write never returned: its thread waits for a lock it holds itself")
        self.assertEqual(_read_all(read_end).split(RECORD_END), [b"being written\n", b"from the handler\n", b""])

    def test_a_handler_waiting_for_another_threads_lock_is_not_waited_for(self) -> None:
        """A thread holding a lock of its own writes while a handler mid-write waits for that lock: no cycle."""
        import threading

        from muxtwist._worker_log import RECORD_END

        read_end, out = _pipe_to_parent(self)
        theirs = threading.Lock()  # as Twisted's legacy log keeps around its observers
        inside, queued, handled = threading.Event(), threading.Event(), []

        def other_thread() -> None:
            with theirs:
                inside.wait(10)
                out.write(b"from the thread\n")
                queued.set()

        real_write = os.write

        def write(fd: int, data: Any) -> int:
            if fd == out._fd and not handled:
                handled.append(False)
                inside.set()
                queued.wait(2)
                if theirs.acquire(timeout=5):  # the handler logs through the thread's lock
                    try:
                        out.write(b"from the handler\n")
                        handled[0] = True
                    finally:
                        theirs.release()
            return real_write(fd, data)

        self.patch(os, "write", write)
        thread = threading.Thread(target=other_thread, daemon=True)
        thread.start()
        out.write(b"being written\n")
        thread.join(10)
        self.assertEqual(handled, [True], "the handler waited for a lock the waiting thread held: a cycle")
        expected = [b"being written\n", b"from the thread\n", b"from the handler\n", b""]
        self.assertEqual(_read_all(read_end).split(RECORD_END), expected)

    def test_a_retry_that_finds_the_lock_taken_is_not_lost(self) -> None:
        """The retry timer fires while a thread writes: held events still go out by later retries alone."""
        import threading

        from twisted.internet.task import Clock

        from muxtwist._worker_log import RECORD_END

        clock = Clock()
        read_end, out = _pipe_to_parent(self, clock, size=4096)
        big = b"x" * 3000 + b"\n"
        for _ in range(4):  # past the pipe: the rest held, a retry due
            out.write(big)
        real_write = os.write
        inside, go = threading.Event(), threading.Event()

        def write(fd: int, data: Any) -> int:
            if threading.current_thread().name == "writer" and not go.is_set():
                inside.set()
                go.wait(10)
            return real_write(fd, data)

        self.patch(os, "write", write)
        writer = threading.Thread(target=out.write, args=(b"from the thread\n",), name="writer", daemon=True)
        writer.start()
        self.assertTrue(inside.wait(10))
        clock.advance(0.06)  # the retry, while the thread holds the lock
        go.set()
        writer.join(10)
        received = b""
        for _ in range(40):  # the parent reads; nothing is written but by retries
            received += _read_all(read_end)
            clock.advance(0.05)
        self.assertEqual(received.split(RECORD_END), [big] * 4 + [b"from the thread\n", b""])

    def test_retries_scheduled_twice_at_once_go_on_as_one(self) -> None:
        """Two callers that both found no retry due schedule two; while the parent reads nothing, one goes on."""
        from twisted.internet.task import Clock

        clock = Clock()
        read_end, out = _pipe_to_parent(self, clock, size=4096)
        for _ in range(4):  # past the pipe: the rest held, a retry due
            out.write(b"x" * 3000 + b"\n")
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        out._retry = None  # what a second caller saw, at the same moment as the first
        out._later()
        self.assertEqual(len(clock.getDelayedCalls()), 2)
        for _ in range(20):
            clock.advance(0.05)
        self.assertEqual(len(clock.getDelayedCalls()), 1)

    def test_a_worker_logging_from_a_signal_handler_under_load_keeps_every_event_whole(self) -> None:
        """A process whose timer signal handler logs 2,000 times while it logs 20,000 events ends, all whole."""
        import subprocess

        script = """
import os, signal, sys
from muxtwist._worker_log import ToParent
out = ToParent(1)
handled = 0
def handler(signum, frame):
    global handled
    if handled < 2000:
        handled += 1
        out.write(b"handler %d\\n" % handled)
signal.signal(signal.SIGALRM, handler)
signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0001)
written = 0
while written < 20000 or handled < 2000:
    out.write(b"main %d\\n" % written)
    written += 1
signal.setitimer(signal.ITIMER_REAL, 0)
out.close()
"""
        try:
            proc = subprocess.run(
                [sys.executable, "-c", script], capture_output=True, timeout=60, start_new_session=True
            )
        except subprocess.TimeoutExpired:
            self.fail("the process never ended: a handler's write waited for the lock its own thread held")
        self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
        records = proc.stdout.split(b"\x1e")
        self.assertEqual(records.pop(), b"")
        handler = [r for r in records if r.startswith(b"handler ")]
        main = [r for r in records if r.startswith(b"main ")]
        self.assertEqual(len(handler) + len(main), len(records), [r for r in records if not r.endswith(b"\n")][:3])
        self.assertEqual(sorted(int(r.split()[1]) for r in handler), list(range(1, 2001)))
        self.assertEqual([int(r.split()[1]) for r in main], list(range(len(main))))
        self.assertGreaterEqual(len(main), 20000)


class _ThreadClock:
    """A reactor stand-in whose later calls the test makes itself (``out._again()``)."""

    def callLater(self, delay: float, f: Any, *args: Any) -> object:
        return object()

    def callFromThread(self, f: Any, *args: Any) -> None:
        pass

    def seconds(self) -> float:
        return 0.0  # a retry due is never taken as lost: the test runs them


class TwistdOptionTests(unittest.TestCase):
    def _logger(self, *argv: str) -> Any:
        self.addCleanup(use_twistd_options, {})
        options = ServerOptions()
        options.parseOptions([*argv, "muxtwist", "--inherit", "9=tcp:3000"])
        return options["logger"]

    def test_text_logs_use_the_faster_observer(self) -> None:
        """Under twistd, text logs (the default) come from muxtwist's observer."""
        self.assertIs(self._logger("-n"), text_log_observer)

    def test_a_given_logger_or_syslog_is_kept(self) -> None:
        """--logger and --syslog given to twistd are twistd's to honour."""
        from twisted.logger import globalLogPublisher

        self.assertIs(self._logger("-n", "--logger", "twisted.logger.globalLogPublisher"), globalLogPublisher)
        self.assertIsNone(self._logger("--syslog"))
