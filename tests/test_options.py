"""
Tests for muxtwist._options: actions refuse options they cannot use when they
are built, naming the option, the value and what is expected.
"""

from __future__ import annotations

import os

from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from muxtwist._options import OptionError
from muxtwist.actions import Proxy, RedirectToHTTPS, TerminateTLS

BACKEND = "tcp:host=127.0.0.1:port=6379"


class ActionOptionTests(unittest.TestCase):
    """Each bad option is one ValueError (also a TypeError) saying option=value: expected what."""

    def refused(self, build: object, *args: object, **options: object) -> str:
        error = self.assertRaises(OptionError, build, *args, **options)
        self.assertIsInstance(error, ValueError)
        self.assertIsInstance(error, TypeError)
        return str(error)

    def test_proxy_options(self) -> None:
        """Proxy names the bad option and value: timeouts, limits, splice and backend descriptions."""
        cases = {
            "connect_timeout": ("5", "Proxy option connect_timeout='5': expected a positive number of seconds"),
            "idle_timeout": (0, "Proxy option idle_timeout=0: expected a positive number of seconds or None"),
            "max_connections": (-1, "Proxy option max_connections=-1: expected a positive integer or None"),
            "max_fails": (0, "Proxy option max_fails=0: expected a positive integer"),
            "fail_timeout": (True, "Proxy option fail_timeout=True: expected a positive number of seconds"),
            "splice": ("no", "Proxy option splice='no': expected True or False"),
            "tls": ("", "Proxy option tls='': expected True, a hostname to verify"),
        }
        for option, (value, message) in cases.items():
            self.assertIn(message, self.refused(Proxy, BACKEND, **{option: value}), option)

    def test_proxy_backend_descriptions(self) -> None:
        """A backend description Twisted cannot parse is refused with its index and an example of a good one."""
        text = self.refused(Proxy, "tcp:6379")
        self.assertIn("Proxy option backends='tcp:6379': expected a client endpoint description", text)
        text = self.refused(Proxy, [BACKEND, "bogus:x"])
        self.assertIn("Proxy option backends[1]='bogus:x'", text)
        self.assertIn("Unknown endpoint type", text)
        self.assertIn("expected an endpoint description string or a non-empty list", self.refused(Proxy, []))

    def test_terminate_tls_options(self) -> None:
        """TerminateTLS checks its options before it reads any certificate."""
        factory = Factory.forProtocol(Protocol)
        missing = os.path.join(self.mktemp(), "certs")
        cases = {
            "alpn": ("h2", "TerminateTLS option alpn='h2': expected a list of protocol names"),
            "handshake_timeout": ("3", "TerminateTLS option handshake_timeout='3': expected a positive number"),
            "resumption": ("yes", "TerminateTLS option resumption='yes': expected True or False"),
            "client_ca": (3, "TerminateTLS option client_ca=3: expected the path of a PEM file"),
        }
        for option, (value, message) in cases.items():
            self.assertIn(message, self.refused(TerminateTLS, missing, factory, **{option: value}), option)
        self.assertIn("TerminateTLS option certificates=42", self.refused(TerminateTLS, 42, factory))

    def test_terminate_tls_client_ca_that_cannot_be_read(self) -> None:
        """A client_ca path that does not exist names the option and the reason, not an OpenSSL error list."""
        missing = os.path.join(os.path.abspath(self.mktemp()), "ca.pem")
        message = self.refused(TerminateTLS, self.mktemp(), Factory.forProtocol(Protocol), client_ca=missing)
        self.assertEqual(
            message,
            f"TerminateTLS option client_ca={missing!r}: expected the path of a PEM file of CA certificates, "
            "or None (No such file or directory)",
        )

    def test_terminate_tls_certificate_mapping_values(self) -> None:
        """A {hostname: path} mapping whose value is not a path or a (certificate, key) pair names the host."""
        factory = Factory.forProtocol(Protocol)
        for value in (3, None, ("a.pem",), ("a.pem", 3)):
            self.assertEqual(
                self.refused(TerminateTLS, {"a.test": value}, factory),
                f"TerminateTLS option certificates['a.test']={value!r}: expected the path of a PEM file holding "
                "the chain and the key, or a (certificate path, key path) pair",
            )
        self.assertIn(
            "TerminateTLS option certificates[3]=",
            self.refused(TerminateTLS, {3: "a.pem"}, factory),
        )

    def test_redirect_port(self) -> None:
        """RedirectToHTTPS takes a port number or None, not a string or a bool."""
        for value in ("443", True, 0, 70000):
            self.assertIn(
                f"RedirectToHTTPS option port={value!r}: expected a port number 1-65535, or None",
                self.refused(RedirectToHTTPS, port=value),
            )
        self.assertIsNotNone(RedirectToHTTPS(port=8443))


class MoreActionOptionTests(unittest.TestCase):
    """Options that were accepted, or failed later with an unrelated message."""

    refused = ActionOptionTests.refused

    def test_health_check_options(self) -> None:
        """HealthCheck names its bad option: seconds, counts and the bytes to send or expect."""
        from muxtwist.actions import HealthCheck

        cases = {
            "interval": ("x", "HealthCheck option interval='x': expected a positive number of seconds"),
            "timeout": (0, "HealthCheck option timeout=0: expected a positive number of seconds"),
            "fall": (1.5, "HealthCheck option fall=1.5: expected a positive integer"),
            "rise": ("2", "HealthCheck option rise='2': expected a positive integer"),
            "send": (3, "HealthCheck option send=3: expected bytes or None"),
            "expect": ("PONG", "HealthCheck option expect='PONG': expected bytes or None"),
        }
        for option, (value, message) in cases.items():
            self.assertIn(message, self.refused(HealthCheck, **{option: value}), option)
        HealthCheck(interval=0.5, send=b"PING\r\n", expect=b"+PONG")

    def test_seconds_that_are_not_finite_floats(self) -> None:
        """NaN, infinity and an integer too large for a float are refused for every seconds option of an action."""
        from muxtwist.actions import HealthCheck
        from muxtwist.udp import UDPProxy

        factory = Factory.forProtocol(Protocol)
        missing = os.path.join(self.mktemp(), "certs")
        for value in (float("nan"), float("inf"), 10**400):
            for option in ("connect_timeout", "idle_timeout", "fail_timeout"):
                self.assertIn(f"Proxy option {option}=", self.refused(Proxy, BACKEND, **{option: value}), option)
            message = self.refused(TerminateTLS, missing, factory, handshake_timeout=value)
            self.assertIn("TerminateTLS option handshake_timeout=", message)
            for option in ("interval", "timeout"):
                self.assertIn(f"HealthCheck option {option}=", self.refused(HealthCheck, **{option: value}), option)
            error = self.assertRaises(ValueError, Proxy, BACKEND, close_timeout=value)
            self.assertIn("close_timeout must be a positive number of seconds", str(error))
            error = self.assertRaises(ValueError, UDPProxy, "udp:host=127.0.0.1:port=53", idle_timeout=value)
            self.assertIn("idle_timeout must be a positive number of seconds", str(error))

    def test_number_subclasses_are_checked_by_their_values(self) -> None:
        """An int or float subclass whose comparisons say yes to anything is refused for its value (NaN, 0, -5)."""
        from muxtwist.apps import WSGI

        class Agreeing(float):
            def __gt__(self, other: object) -> bool:
                return True

            def __lt__(self, other: object) -> bool:
                return True

            def __le__(self, other: object) -> bool:
                return True

        class AgreeingInt(int):
            def __lt__(self, other: object) -> bool:
                return False

        def app(environ: object, start_response: object) -> list[bytes]:
            return []

        for value in (Agreeing("nan"), Agreeing(-5.0)):
            self.assertIn("WSGI option send_timeout=", self.refused(WSGI, app, send_timeout=value))
            self.assertIn("Proxy option connect_timeout=", self.refused(Proxy, BACKEND, connect_timeout=value))
        self.assertIn("WSGI option threads=", self.refused(WSGI, app, threads=AgreeingInt(0)))

    def test_terminate_tls_factory(self) -> None:
        """TerminateTLS refuses a factory that is not a protocol factory (None, a number) at construction."""
        missing = os.path.join(self.mktemp(), "certs")
        for factory in (None, 3):
            message = self.refused(TerminateTLS, missing, factory)
            self.assertIn("TerminateTLS option factory=", message)

    def test_proxy_transparent_is_a_boolean(self) -> None:
        """Proxy(transparent=...) takes True or False, not a truthy string."""
        message = self.refused(Proxy, BACKEND, transparent="yes")
        self.assertIn("Proxy option transparent='yes': expected True or False", message)

    def test_values_in_errors_are_shown_shortened(self) -> None:
        """A huge integer, a long string or a value whose repr raises is shown in at most 200 characters."""

        class Odd:
            def __repr__(self) -> str:
                raise RuntimeError("no repr")

        factory = Factory.forProtocol(Protocol)
        missing = os.path.join(self.mktemp(), "certs")
        for value in (10**5000, -(10**4000), "x" * 100_000, Odd()):
            messages = [
                self.refused(Proxy, BACKEND, splice=value),
                self.refused(TerminateTLS, missing, factory, handshake_timeout=value),
                self.refused(RedirectToHTTPS, port=value),
            ]
            for message in messages:
                shown = message.split("=", 1)[1].split(": expected ")[0]
                self.assertLessEqual(len(shown), 200, message[:300])
        message = self.refused(Proxy, BACKEND, max_connections=-(10**5000))
        self.assertIn("max_connections=-10000000000000000000... (an integer of 5001 digits): expected", message)
        message = self.refused(Proxy, BACKEND, connect_timeout=Odd())
        self.assertIn("connect_timeout=<Odd instance at 0x", message)
