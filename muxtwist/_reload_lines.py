"""
The log lines a reload's listener changes write, for TCP
(:mod:`muxtwist._reload`) and UDP (:mod:`muxtwist.udp.listener`) alike:
each side passes its own ``Logger``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.logger import Logger

__all__ = ["cannot_listen", "listen_again", "serve_on", "served_by"]


def cannot_listen(log: Logger, description: str, problem: Exception, *, again: bool = True) -> None:
    """A listener the rules file adds could not listen (``again``: the next reload tries it again)."""
    log.error(
        "reload: cannot listen on {description}: {problem}{again}",
        description=description,
        problem=str(problem),
        again="; the next reload tries again" if again else "",
    )


def listen_again(log: Logger, description: str, start: Callable[[], object]) -> bool:
    """
    ``start()`` the listener of ``description`` again, with its running
    rules: a reload closed it for a new one on its port that then could not
    listen. Whether it could; said in the log either way.
    """
    try:
        start()
    except Exception as e:
        log.error(
            "reload: cannot listen again on {description}: {problem}; its port stays closed until a reload"
            " listens on it",
            description=description,
            problem=str(e),
        )
        return False
    log.warn(
        "reload: listening again on {description}, with its running rules: the listener the rules file puts"
        " on its port could not listen",
        description=description,
    )
    return True


def serve_on(log: Logger, descriptions: Sequence[str]) -> None:
    """Listeners the rules file removes serve on, because one it adds could not listen."""
    log.error(
        "reload: {kept} serve(s) on with the running rules until every listener the rules file adds listens",
        kept=", ".join(descriptions),
    )


def served_by(log: Logger, description: str, new: str, address: str) -> None:
    """
    A listener a reload closed for a new one on its address does not listen
    again: that new one listens on its very address (``new``'s port reports
    it), with the new rules.
    """
    log.warn(
        "reload: {description} does not listen again: {new} listens on its address ({address}) and serves it"
        " with the new rules",
        description=description,
        new=new,
        address=address,
    )
