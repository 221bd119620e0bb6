"""
Hold SIGHUP from the interpreter's first moments in ``twistd ... muxtwist``.

``muxtwist-startup.pth`` (installed next to this module) imports it while
Python reads its site directories, before the program runs. In any process
but ``twistd ... muxtwist`` it does nothing but read ``sys.orig_argv``.
In that one it sets a SIGHUP handler that only remembers the signal, so a
reload asked while twistd is still importing itself (about half a second)
is one reload once serving instead of the end of the process (SIGHUP's
default action). :mod:`muxtwist._signals` takes over from here.

Standard library only and nothing slow: it runs in every interpreter that
starts with this package installed.
"""

import sys

#: How many SIGHUPs arrived while this module's handler was in place.
pending = 0


def _held(signum: object, frame: object) -> None:
    global pending
    pending += 1


def _is_twistd_muxtwist(argv: list[str]) -> bool:
    """Whether ``argv`` (``sys.orig_argv``) starts ``twistd`` or ``python -m twisted`` with the muxtwist plugin."""
    if "muxtwist" not in argv:
        return False
    head = argv[: argv.index("muxtwist")]
    named_twistd = any(word.rsplit("/", 1)[-1] == "twistd" for word in head[:2])
    return named_twistd or any(head[i : i + 2] == ["-m", "twisted"] for i in range(len(head) - 1))


def hold() -> None:
    """Install the remembering SIGHUP handler in ``twistd ... muxtwist`` when SIGHUP's action is still the default."""
    if not _is_twistd_muxtwist(list(getattr(sys, "orig_argv", sys.argv))):
        return
    # The C module under ``signal``: the interpreter has loaded it already,
    # while ``signal`` itself would first import ``enum`` and more (several
    # milliseconds during which a SIGHUP would still end the process).
    import _signal  # type: ignore[import-not-found]  # no stubs: the C half of signal

    if _signal.getsignal(_signal.SIGHUP) in (_signal.SIG_DFL, _signal.SIG_IGN):
        _signal.signal(_signal.SIGHUP, _held)


hold()
