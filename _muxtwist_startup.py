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


#: The options of ``twistd`` (``twisted.scripts.twistd.ServerOptions``) and
#: of ``twist`` (what ``python -m twisted`` runs: ``TwistOptions``) as
#: ``getopt`` is given them: long names (``=`` when the option takes a value)
#: and short letters (``:`` after one that takes a value). Kept here, not
#: read from Twisted, which this hook must not import; ``tests/test_tap.py``
#: compares them with Twisted's own so that they follow its changes.
OPTIONS = {
    "twistd": (
        (
            "chroot=", "debug", "encrypted", "euid", "file=", "gid=", "help", "help-reactors",
            "logfile=", "logger=", "no_save", "nodaemon", "originalname", "pidfile=", "prefix=",
            "profile=", "profiler=", "python=", "reactor=", "rundir=", "savestats", "source=",
            "spew", "syslog", "uid=", "umask=", "version",
        ),
        "oenl:p:f:y:s:d:u:g:r:b",
    ),
    "twist": (("help", "version", "reactor=", "log-level=", "log-file=", "log-format="), ""),
}  # fmt: skip


def subcommand(args: list[str], command: str) -> str | None:
    """
    The subcommand of ``twistd ARGS`` (``command="twistd"``) or ``twist
    ARGS`` (``"twist"``): the first word after the program's own options,
    read as Twisted reads them (``getopt``: the word after an option that
    takes a value is that value, ``-nl x`` and ``-lx`` included, long
    options may be shortened to a unique prefix, ``--`` ends the options).
    ``None`` when there is none, or the options are ones Twisted refuses.
    """
    longopts, shortopts = OPTIONS[command]
    at = 0
    while at < len(args):
        arg = args[at]
        if arg == "--":
            return args[at + 1] if at + 1 < len(args) else None
        if arg == "-" or not arg.startswith("-"):
            return arg
        if arg.startswith("--"):
            name, equals, _ = arg[2:].partition("=")
            possible = [o for o in longopts if o.startswith(name)]
            if name in possible:
                takes_value = False
            elif name + "=" in possible:
                takes_value = True
            elif len(possible) == 1:
                takes_value = possible[0].endswith("=")
            else:
                return None  # unknown or ambiguous: twistd stops with a usage error
            if equals and not takes_value:
                return None
            at += takes_value and not equals  # the value is the next word
        else:
            for i, letter in enumerate(arg[1:], 2):
                found = shortopts.find(letter) if letter != ":" else -1
                if found < 0:
                    return None
                if shortopts.startswith(":", found + 1):
                    at += i == len(arg)  # -l VALUE; in -lVALUE the rest of the word is the value
                    break
        at += 1
    return None


def _is_twistd_muxtwist(argv: list[str], orig_argv: list[str]) -> bool:
    """
    Whether this process runs ``twistd ... muxtwist`` or ``python -m twisted
    ... muxtwist`` (``muxtwist`` being the subcommand, not an option's
    value): the test the twistd plugin makes once it is imported
    (:func:`running_muxtwist`), so that every hold made here is taken over there.

    :param argv: ``sys.argv`` while the site directories are read: the
        interpreter's own options (``-u``, ``-I``, ``-X dev``, a shebang's
        ``-sP``...) are already gone; the script first, or ``-m`` for a module.
    :param orig_argv: ``sys.orig_argv``, which still names the module.
    """
    if not argv or "muxtwist" not in argv[1:]:
        return False
    if os.path.basename(argv[0]) == "twistd":
        return subcommand(argv[1:], "twistd") == "muxtwist"
    if argv[0] != "-m":
        return False
    # The module's name is the word just before the program's arguments.
    at = len(orig_argv) - len(argv)
    if 0 < at < len(orig_argv) and orig_argv[at] in ("twisted", "-mtwisted"):
        return subcommand(argv[1:], "twist") == "muxtwist"
    return False


def running_muxtwist(argv: list[str]) -> bool:
    """
    Whether ``argv`` (``sys.argv`` once the program runs) is ``twistd ...
    muxtwist`` or ``python -m twisted ... muxtwist`` (where ``argv[0]`` is
    ``twisted/__main__.py``), ``muxtwist`` being the subcommand; not another
    twistd command, nor a program scanning plugins.
    """
    if not argv:
        return False
    if os.path.basename(argv[0]) == "twistd":
        return subcommand(argv[1:], "twistd") == "muxtwist"
    if argv[0].endswith(os.path.join("twisted", "__main__.py")):
        return subcommand(argv[1:], "twist") == "muxtwist"
    return False


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
