"""
Hold SIGHUP from the interpreter's first moments in ``twistd ... muxtwist``.

``muxtwist-startup.pth`` (installed next to this module) runs while Python
reads its site directories, before the program runs. It imports this module
only when the command line has the word ``muxtwist`` in it: any other program
pays for one membership test. In ``twistd ... muxtwist`` (or ``python -m
twisted ... muxtwist``) it sets a SIGHUP handler that only remembers the
signal, so a reload asked while twistd is still importing itself (about half
a second) is one reload once serving instead of the end of the process
(SIGHUP's default action). :mod:`muxtwist._signals` takes over from here.

Standard library only, and before the hold only modules the interpreter has
loaded already (``os``, ``sys``, the C half of ``signal``): any other import
would delay it.
"""

import os
import sys

#: How many SIGHUPs arrived while this module's handler was in place.
pending = 0


def _held(signum: object, frame: object) -> None:
    global pending
    pending += 1


def _is_twistd_muxtwist(argv: list[str], orig_argv: list[str]) -> bool:
    """
    Whether this process runs ``twistd ... muxtwist`` or ``python -m twisted
    ... muxtwist``: the test the twistd plugin makes once it is imported
    (``twisted/plugins/muxtwist_plugin.py``), so that every hold made here is
    taken over there.

    :param argv: ``sys.argv`` while the site directories are read: the
        interpreter's own options (``-u``, ``-I``, ``-X dev``, a shebang's
        ``-sP``...) are already gone; the script first, or ``-m`` for a module.
    :param orig_argv: ``sys.orig_argv``, which still names the module.
    """
    if not argv or "muxtwist" not in argv[1:]:
        return False
    if os.path.basename(argv[0]) == "twistd":
        return True
    if argv[0] != "-m":
        return False
    # The module's name is the word just before the program's arguments.
    at = len(orig_argv) - len(argv)
    return 0 < at < len(orig_argv) and orig_argv[at] in ("twisted", "-mtwisted")


def _ignore_at_exit() -> None:
    """
    At exit, a SIGHUP still held here becomes ignored: the interpreter puts
    SIGHUP's default action back before the process ends, and a SIGHUP then
    would replace the exit status (a failed start's 1) by death by signal.
    """
    import _signal  # type: ignore[import-not-found]  # no stubs: the C half of signal

    if _signal.getsignal(_signal.SIGHUP) is _held:
        _signal.signal(_signal.SIGHUP, _signal.SIG_IGN)


def hold() -> bool:
    """
    Install the remembering SIGHUP handler in ``twistd ... muxtwist`` when
    SIGHUP's action is still the default (or ignored, as under ``nohup``);
    whether it did.
    """
    if not _is_twistd_muxtwist(getattr(sys, "argv", []), getattr(sys, "orig_argv", [])):
        return False
    # The C module under ``signal``: the interpreter has loaded it already,
    # while ``signal`` itself would first import ``enum`` and more (several
    # milliseconds during which a SIGHUP would still end the process).
    import _signal

    if _signal.getsignal(_signal.SIGHUP) not in (_signal.SIG_DFL, _signal.SIG_IGN):
        return False
    _signal.signal(_signal.SIGHUP, _held)
    import atexit

    atexit.register(_ignore_at_exit)
    return True


hold()
