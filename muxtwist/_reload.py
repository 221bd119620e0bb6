"""
The listener changes of a reload of ``MuxService``'s rules file: which old
listener is in a new one's way, and the order in which new listeners start
and old ones close (added ones first; an old one in a new one's way closes
first and listens again if the new one cannot, unless a new one's port
listens on its very address).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, endpoints
from twisted.logger import Logger

from muxtwist._limits import address_text
from muxtwist._listener import Listener
from muxtwist._reload_lines import cannot_listen, listen_again, serve_on, served_by
from muxtwist._twisted import endpoint_port, endpoint_unix_path
from muxtwist.config import Config, build_factory

__all__ = ["ListenerChanges"]

#: The lines of a reload, where they were before this module was split from the service.
log = Logger(namespace="muxtwist.service")


def _same_address(old: Listener, new: Listener) -> bool | None:
    """
    Whether ``old`` holds the address ``new`` listens on, so that it must
    close before ``new`` can listen: two TCP (or ``ssl:``) endpoints on the
    same port number other than 0, whatever their interfaces, two ``unix:``
    endpoints on the same path, two ``systemd:`` (adopted) endpoints of the
    same socket; ``None`` (it may) for two other endpoints (a plugin's),
    whose addresses cannot be compared.
    """
    old_path, new_path = endpoint_unix_path(old.endpoint), endpoint_unix_path(new.endpoint)
    if old_path is not None and new_path is not None:
        # The same socket file, however its path is written (a directory through a symlink).
        return os.path.realpath(old_path) == os.path.realpath(new_path)
    old_fd, new_fd = _adopted(old.endpoint), _adopted(new.endpoint)
    if old_fd is not None and new_fd is not None:
        # Sockets systemd passed, by descriptor: two descriptors are two sockets.
        return old_fd == new_fd
    old_at, new_at = endpoint_port(old.endpoint), endpoint_port(new.endpoint)
    if old_at is None or new_at is None:
        if old_at is None and new_at is None and old_fd is None and new_fd is None:
            return None
        return False
    return old_at[0] == new_at[0] != 0


def _in_the_way(old: Listener, new: Listener) -> bool:
    """Whether ``old`` may hold the address ``new`` listens on (see ``_same_address``)."""
    return _same_address(old, new) is not False


def _bound(listener: Listener) -> object | None:
    """The address ``listener``'s port listens on (``getHost()``); ``None`` if it has none or cannot tell."""
    if listener.port is None:
        return None
    try:
        address: object = listener.port.getHost()
    except Exception:
        return None
    return address


def _adopted(endpoint: Any) -> int | None:
    """The descriptor of an endpoint that adopts a listening socket (``systemd:``); ``None`` for any other."""
    if isinstance(endpoint, endpoints.AdoptedStreamServerEndpoint):
        fileno: int = endpoint.fileno
        return fileno
    return None


class _GivenUp(ValueError):
    """A listener would adopt a ``systemd:`` socket that an earlier reload closed."""


class ListenerChanges:
    """
    Mixin for ``MuxService``: the TCP (stream) listener changes of a reload.
    The service starts, closes and drains listeners; this decides the order.
    """

    in_worker: bool
    draining: bool
    config_path: str | None
    namedServices: dict[str, Any]
    _reactor: Any
    #: The descriptors of the ``systemd:`` sockets this service has listened
    #: on. Twisted closes one once it adopts it, so no later listener may
    #: adopt that number again: it may since belong to another file.
    _adopted_fds: set[int]

    if TYPE_CHECKING:
        # What the service provides (it starts, closes and drains listeners).

        def _start_listener(self, listener: Listener) -> None: ...

        def _close_port(self, listener: Listener, *, drain: bool = True) -> defer.Deferred[None]: ...

        def _drain_in_background(self, listener: Listener) -> None: ...

    async def _change_listeners(self, gone: list[Listener], added: dict[str, tuple[Any, ...]], config: Config) -> bool:
        """
        Start the listeners ``added``, then close those ``gone`` if every
        added one listens (see :meth:`_reload_now`); whether all did.
        """
        failed: list[str] = []
        new: list[Listener] = []
        for description, rules in added.items():
            if self.in_worker:
                log.error(
                    "reload: cannot add listener {description} in a worker; restart to add listeners",
                    description=description,
                )
                failed.append(description)
                continue
            try:
                listener = Listener(description, build_factory(rules, config.settings, self._reactor), self._reactor)
                self._refuse_adopted_again(listener)
                new.append(listener)
            except Exception as e:
                self._cannot_listen(description, e)
                failed.append(description)
        # Old ports that a new listener needs close first.
        first = [old for old in gone if any(_in_the_way(old, listener) for listener in new)]
        bound = {old.description: _bound(old) for old in first}
        await defer.gatherResults([self._close_port(old, drain=False) for old in first])
        if self.draining:
            # A stop began while they closed: nothing more listens.
            log.info("reload: the service is stopping; no new listener starts")
            for old in first:
                self._drain_in_background(old)
            return False
        started: list[Listener] = []
        for listener in new:
            try:
                self._start_listener(listener)
            except Exception as e:
                self._cannot_listen(listener.description, e)
                failed.append(listener.description)
            else:
                started.append(listener)
        for old in first:
            # A new listener that surely took its address replaces it; one whose address cannot
            # be compared with it (a plugin's) does only if the reload fully took effect.
            taken = any(_same_address(old, listener) for listener in started)
            maybe = any(_same_address(old, listener) is None for listener in started)
            address = bound[old.description]
            holder = next(
                (listener for listener in started if address is not None and _bound(listener) == address), None
            )
            if taken or (maybe and not failed):
                self._drain_in_background(old)
            elif holder is not None:
                # Its description could not say so (a plugin's endpoint), but its port listens where the old one did.
                served_by(log, old.description, holder.description, address_text(address))
                self._drain_in_background(old)
            elif not self._listen_again(old):
                self._drain_in_background(old)
        rest = [old for old in gone if old not in first]
        if failed:
            if rest:
                serve_on(log, [old.description for old in rest])
            log.error(
                "reloaded {path}, but {n} listener(s) did not start: {failed}",
                path=self.config_path,
                n=len(failed),
                failed=", ".join(failed),
            )
            return False
        await defer.gatherResults([self._close_port(old) for old in rest])
        return True

    def _keep_adopted(self, current: dict[str, Listener], wanted: list[str]) -> None:
        """
        Give a listener on a socket systemd passed the description the rules
        file now names that socket by (``name=`` for ``index=``, its options
        in another order): it keeps its port. Twisted closes such a
        descriptor once it has adopted it, so a new listener could not adopt
        it again and the socket would be lost for good.
        """
        self._adopted_fds.update(fd for old in current.values() if (fd := _adopted(old.endpoint)) is not None)
        gone = {d: old for d, old in current.items() if d not in wanted and _adopted(old.endpoint) is not None}
        if self.in_worker or not gone:
            return
        for description in wanted:
            if description in current:
                continue
            try:
                fileno = _adopted(endpoints.serverFromString(self._reactor, description))
            except Exception:
                continue  # the reload says what is wrong with it when it builds its listener
            same = next((d for d, old in gone.items() if fileno is not None and _adopted(old.endpoint) == fileno), None)
            if same is None:
                continue
            kept = gone.pop(same)
            del self.namedServices[same]
            kept.name = kept.description = description
            self.namedServices[description] = kept
            log.info(
                "reload: {old} is now {description}: the same socket, which keeps listening",
                old=same,
                description=description,
            )

    def _refuse_adopted_again(self, listener: Listener) -> None:
        """
        Raise if ``listener`` would adopt a ``systemd:`` socket that a
        listener of this service adopted and a reload has since closed.
        """
        fileno = _adopted(listener.endpoint)
        if fileno is not None and fileno in self._adopted_fds:
            raise _GivenUp(
                f"socket {fileno} was listened on by a listener an earlier reload closed, and closed with it"
                " (Twisted closes a socket it adopts); restart the service to listen on it again"
            )

    def _cannot_listen(self, description: str, problem: Exception) -> None:
        cannot_listen(log, description, problem, again=not isinstance(problem, _GivenUp))

    def _listen_again(self, old: Listener) -> bool:
        """
        Listen on the description of ``old``, a listener a reload closed for
        a new one on its port that then could not listen, with its factory
        (its running rules, its connections); whether it could.
        """
        return listen_again(
            log, old.description, lambda: self._start_listener(Listener(old.description, old.factory, self._reactor))
        )
