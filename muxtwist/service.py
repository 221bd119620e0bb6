"""
:class:`MuxService`: listeners, the registry of their live connections, a
graceful stop, and reloading the rules file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from muxtwist._listener import Listener
from muxtwist._reachable import within
from muxtwist._reload import ListenerChanges
from muxtwist._report import Observers
from muxtwist._signals import SignalHandlers
from muxtwist._twisted import default_reactor
from muxtwist.admin import admin_site
from muxtwist.config import Config, ConfigError, apply_settings, build_factory, endpoint_description, load_config
from muxtwist.metrics import EmfileWatcher, Metrics, default_metrics
from muxtwist.sniffing import SniffingFactory, SniffingProtocol
from muxtwist.tls import reload_all_certificates
from muxtwist.udp.listener import add_udp_listener, is_udp, reload_udp_listeners

__all__ = ["Listener", "MuxService", "wanted_listeners"]

log = Logger()


def wanted_listeners(config: Config, ports: tuple[str, ...]) -> dict[str, tuple[Any, ...]]:
    """The listeners a rules file asks for: ``ports`` (or ``tcp:3000``) with ``rules``, plus ``listeners``."""
    wanted: dict[str, tuple[Any, ...]] = {}
    if config.rules is not None:
        for port in ports or (("tcp:3000",) if not config.listeners else ()):
            wanted[endpoint_description(port)] = config.rules
    wanted.update(config.listeners)
    return wanted


class MuxService(SignalHandlers, ListenerChanges, MultiService):
    """
    A ``MultiService`` of sniffing listeners, for ``twistd`` or as a child of
    your own application.

    On stop it stops accepting, aborts connections still sniffing, lets
    handed-off connections finish for up to ``shutdown_timeout`` seconds and
    aborts the rest; ``stopService``'s Deferred fires when they are all gone,
    those of listeners a reload closed (or is closing) included.

    :param config_path: the rules file that :meth:`reload` reads again.
    :param handle_signals: once the reactor runs, make SIGHUP call
        :meth:`reload`, and SIGTERM/SIGINT stop the reactor (so the stop
        drains connections as above and the process exits 0).
    :param inherited: listening sockets made by a parent process, by
        endpoint description: those listeners adopt them (``--workers``).
    :param metrics: the :class:`~muxtwist.metrics.Metrics` of what this
        service serves: it reads the live numbers of every listener's
        factory, counts the connections of those factories (and of the
        sniffing factories and ``TerminateTLS`` their rules reach) that were
        given no metrics of their own, the flows of the UDP listeners it
        builds, and EMFILE refusals. By default, the process's
        :func:`~muxtwist.metrics.default_metrics`.

    :ivar draining: set once a stop has begun; ``/ready`` answers 503 from then on.
    """

    def __init__(
        self,
        *,
        shutdown_timeout: float = 30.0,
        config_path: str | None = None,
        ports: tuple[str, ...] = (),
        handle_signals: bool = False,
        inherited: Mapping[str, int] | None = None,
        metrics: Metrics | None = None,
        reactor: Any = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._reactor = default_reactor(reactor)
        self.shutdown_timeout = shutdown_timeout
        self.config_path = config_path
        self.ports = ports
        self.handle_signals = handle_signals
        self._old_handlers: dict[int, Any] = {}
        self._stopping_factories: list[SniffingFactory] = []
        #: What a stop waits for besides its listeners: a reload's listener
        #: changes in progress and the drains of the listeners reloads closed.
        self._background: set[defer.Deferred[None]] = set()
        #: The factories of listeners reloads closed, until they are drained.
        self._draining_old: dict[int, SniffingFactory] = {}
        self._held: dict[int, SniffingFactory] = {}
        self._adopted_fds: set[int] = set()
        self.reloaded: list[Callable[[Config], None]] = []
        # Reloads run one after another: each waits for the previous one's
        # old ports to close, so two of them never race for the same port.
        self._reloads: defer.Deferred[None] = defer.succeed(None)
        #: What the reload waiting behind the running one will answer (None: none waits).
        self._next_reload: list[defer.Deferred[bool]] | None = None
        self.inherited = dict(inherited or {})
        self.in_worker = bool(self.inherited)
        self.metrics = metrics if metrics is not None else default_metrics()
        self.draining = False
        self._admin: StreamServerEndpointService | None = None
        self._emfile: EmfileWatcher | None = None

    def set_admin(self, description: str, inherited_fd: int | None = None) -> None:
        """
        Serve :func:`~muxtwist.admin.admin_site` on its own endpoint. It keeps
        answering while the listeners drain, so ``/ready`` can say 503.
        """
        description = endpoint_description(description)
        site = admin_site(self, self.metrics)
        self._admin = Listener(description, site, self._reactor, inherited_fd)  # type: ignore[arg-type]

    @property
    def listeners(self) -> dict[str, Listener]:
        """Every listener, by endpoint description."""
        return {s.description: s for s in self if isinstance(s, Listener)}

    @property
    def connections(self) -> list[SniffingProtocol]:
        """Every live connection on every listener."""
        return [c for listener in self.listeners.values() for c in listener.factory.connections]

    def add_listener(self, description: str, factory: SniffingFactory) -> Listener:
        """
        Serve ``factory`` on ``description`` (a port number or an endpoint
        description); started at once if this service is running.
        """
        description = endpoint_description(description)
        listener = Listener(description, factory, self._reactor, self.inherited.pop(description, None))
        self._start_listener(listener)
        return listener

    def _start_listener(self, listener: Listener) -> None:
        """Start ``listener`` as a child of this service; raise, keeping nothing of it, if it cannot listen."""
        factory = listener.factory
        self._observe(factory)
        # Hold the factory started for the whole service life, so that a port
        # that stops listening does not stop the factories of connections
        # that are still draining.
        took = id(factory) not in self._held
        if took:
            self._held[id(factory)] = factory
            factory.doStart()
        try:
            listener.setServiceParent(self)  # type: ignore[no-untyped-call]
        except BaseException:
            # A listener that could not listen is not kept: a later reload
            # sees it missing and tries again. A factory held before (one
            # listening again after a reload) keeps its hold: it may have
            # connections, and its owner drains it.
            listener.disownServiceParent()  # type: ignore[no-untyped-call]
            if took:
                self._release([factory])
            raise

    def _observe(self, factory: SniffingFactory) -> None:
        """
        Read ``factory``'s live numbers (and those of the sniffing factories
        nested in its rules) at scrape time, and count into these metrics for
        each factory its rules reach (sniffing factories, ``TerminateTLS``)
        that was given no metrics of its own.
        """
        self.metrics.track(factory)
        for each in within([factory]):
            observer = getattr(each, "metrics", None)
            if isinstance(observer, Observers) and not observer.observers:
                each.metrics = self.metrics  # type: ignore[attr-defined]

    def remove_listener(self, description: str) -> defer.Deferred[None]:
        """Stop one listener and drain its connections like a stop does."""
        listener = self.listeners[endpoint_description(description)]
        d = defer.maybeDeferred(listener.disownServiceParent)
        d.addCallback(lambda _: self._drain([listener.factory]))
        return d

    def _close_port(self, listener: Listener, *, drain: bool = True) -> defer.Deferred[None]:
        """
        Stop ``listener`` listening; the Deferred fires once its port is
        closed. Its connections drain in the background, as at a stop,
        unless ``drain`` is false (the caller then drains them, or listens
        with its factory again).
        """
        closed: defer.Deferred[None] = defer.maybeDeferred(listener.disownServiceParent)

        def closed_now(_: object) -> None:
            if drain:
                self._drain_in_background(listener)

        def failed(f: Failure) -> None:
            log.failure("closing {description} failed", f, description=listener.description)

        return closed.addCallbacks(closed_now, failed)

    def _drain_in_background(self, listener: Listener) -> None:
        """Drain the connections of a listener that no longer listens, as a stop does (a stop waits for it)."""
        factory = listener.factory
        self._draining_old[id(factory)] = factory

        def drained(_: object) -> None:
            self._draining_old.pop(id(factory), None)

        draining = self._drain([factory]).addErrback(
            lambda f: log.failure("draining {description} failed", f, description=listener.description)
        )
        self._wait_at_stop(draining.addBoth(drained))

    def _wait_at_stop(self, work: defer.Deferred[Any]) -> None:
        """Make a stop that begins before ``work`` ends wait for it too (its result is left alone)."""
        if work.called:
            return
        done: defer.Deferred[None] = defer.Deferred()
        self._background.add(done)

        def ended(result: object) -> object:
            self._background.discard(done)
            done.callback(None)
            return result

        work.addBoth(ended)

    def _background_done(self) -> defer.Deferred[None] | None:
        """Fires once no background work is left, counting work that starts meanwhile."""
        if not self._background:
            return None
        left = defer.DeferredList(list(self._background))
        return left.addCallback(lambda _: self._background_done())

    def load(self, config: Config) -> None:
        """Create the listeners of a loaded rules file: ``ports`` with ``rules``, plus ``listeners``."""
        self.shutdown_timeout = config.settings.shutdown_timeout
        for description, rules in self._wanted(config).items():
            if is_udp(description):
                add_udp_listener(self, description, rules, config.settings)
                continue
            self.add_listener(description, build_factory(rules, config.settings, self._reactor))

    def _wanted(self, config: Config) -> dict[str, tuple[Any, ...]]:
        return wanted_listeners(config, self.ports)

    def reload(self) -> defer.Deferred[bool]:
        """
        Read the rules file again, once any reload still in progress has
        finished (see :meth:`_reload_now`). Asks made while one reload already
        waits its turn are that reload (they get its result); once the
        service is stopping, a reload that has not begun does nothing and
        fires ``False``.
        """
        result: defer.Deferred[bool] = defer.Deferred()
        if self._next_reload is not None:
            # One reload waits at most: it reads the file when its turn comes,
            # so a burst of asks behind a slow one (an app's startup) is that one.
            self._next_reload.append(result)
            return result
        waiting = self._next_reload = [result]

        def run(_: object) -> defer.Deferred[None] | None:
            self._next_reload = None
            if self.draining:
                log.info("reload skipped: stopping")
                for d in waiting:
                    d.callback(False)
                return None

            def fire(outcome: bool | Failure) -> None:
                for d in waiting:
                    if isinstance(outcome, Failure):
                        d.errback(outcome)
                    else:
                        d.callback(outcome)

            return defer.maybeDeferred(self._reload_now).addBoth(fire)

        self._reloads.addBoth(run)
        return result

    def _reload_now(self) -> defer.Deferred[bool]:
        """
        Read the rules file again. New connections get the new rules and
        settings, live ones keep theirs; listeners that appear are started and
        listeners that disappear are drained. A broken file changes nothing.

        Listeners that appear listen first; those that disappear close (and
        drain) only once every one that appears listens. When one cannot
        listen (its port is taken, say), it is logged, left out and tried
        again at the next reload, and every listener that was to disappear
        serves on with its running rules and settings (a rules file names
        listeners by endpoint description only, so which old one a new one
        replaces is not known); the next reload that starts them all closes
        them. A listener whose description changes but whose port stays
        (say ``tcp:3000`` to ``tcp:3000:interface=127.0.0.1``; see
        ``_in_the_way``) cannot listen beside the old one: the old port
        is closed first, then the new one listens; if it cannot, the old
        description listens again, with the old listener's running rules
        and its connections untouched (logged), so that the port is not
        lost. Connections of a listener that closes drain as at a stop;
        none is cut. Applications of the new
        rules with a startup to wait for (an ``ASGI`` app's lifespan) start
        first: if one fails, or they take longer than ``shutdown_timeout``,
        the reload changes nothing.

        :returns: a Deferred that fires, once the new listeners listen and
            the old ports are closed, with whether the reload fully took
            effect (``False`` for a broken file or a listener that could not
            be started).
        """
        # Every TerminateTLS the listeners' rules reach, nested ones included:
        # certificates rotate even when the rules file has not changed.
        factories = [listener.factory for listener in self.listeners.values()]
        if factories:
            reload_all_certificates(*factories)
        if self.config_path is None:
            log.warn("reload asked, but there is no rules file to read")
            return defer.succeed(False)
        try:
            config = load_config(self.config_path)
        except ConfigError as e:
            log.error("reload failed, keeping the running rules: {problem}", problem=str(e))
            return defer.succeed(False)
        starting = self._new_apps(config)
        if not starting:
            return self._apply(config)
        return self._start_apps(starting, config)

    def _new_apps(self, config: Config) -> list[Any]:
        """
        The applications ``config``'s rules reach that have a startup to wait
        for (an ``ASGI`` app's lifespan: ``when_started``) and are not
        running yet.
        """
        targets = [rule.factory for rules in self._wanted(config).values() for rule in rules]
        targets += [f for f in (config.settings.on_timeout, config.settings.on_no_match) if f is not None]
        return [f for f in within(targets) if hasattr(f, "when_started") and not getattr(f, "numPorts", 1)]

    def _start_apps(self, apps: list[Any], config: Config) -> defer.Deferred[bool]:
        """
        Start ``apps`` and apply ``config`` once every one has started; if one
        fails its startup, or they take longer than ``shutdown_timeout``, stop
        them again and keep the running rules (the old applications serve on).
        """
        for app in apps:
            app.doStart()
        timeout = config.settings.shutdown_timeout
        started = defer.gatherResults([app.when_started() for app in apps], consumeErrors=True)
        timer = self._reactor.callLater(timeout, started.cancel)

        def stop_timer(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        started.addBoth(stop_timer)

        def keep_old(problem: str) -> bool:
            for app in apps:
                app.doStop()
            log.error("reload failed, keeping the running rules: {problem}", problem=problem)
            return False

        def decided(results: list[bool]) -> defer.Deferred[bool] | bool:
            failed = [repr(app) for app, ok in zip(apps, results, strict=True) if not ok]
            if failed:
                return keep_old(f"{', '.join(failed)} failed its startup")
            if self.draining:
                return keep_old("the service is stopping")

            def balance(result: object) -> object:
                # apply() started them too: each now runs once, for the rules that use it.
                for app in apps:
                    app.doStop()
                return result

            return self._apply(config).addBoth(balance)

        def not_started(failure: Failure) -> bool:
            names = ", ".join(repr(app) for app in apps)
            if not timer.active() and timer.called:
                return keep_old(f"{names} did not finish its startup within shutdown_timeout ({timeout} s)")
            return keep_old(f"{names} failed its startup: {failure.getErrorMessage()}")

        return started.addCallbacks(decided, not_started)

    def _apply(self, config: Config) -> defer.Deferred[bool]:
        """The rest of a reload: ``config``'s rules and listeners take over (see :meth:`_reload_now`)."""
        wanted = self._wanted(config)
        total = len(wanted)
        udp_reloaded = reload_udp_listeners(self, {d: r for d, r in wanted.items() if is_udp(d)}, config.settings)
        wanted = {d: r for d, r in wanted.items() if not is_udp(d)}
        self._keep_adopted(self.listeners, list(wanted))
        current = self.listeners
        for description, rules in wanted.items():
            if description in current:
                apply_settings(current[description].factory, rules, config.settings)
                self._observe(current[description].factory)  # sniffing factories the new rules nest
        self.shutdown_timeout = config.settings.shutdown_timeout
        for hook in self.reloaded:
            hook(config)
        gone = [current[d] for d in sorted(set(current) - set(wanted))]
        added = {d: rules for d, rules in wanted.items() if d not in current}
        tcp_reloaded = defer.Deferred.fromCoroutine(self._change_listeners(gone, added, config))

        def said(results: list[bool]) -> bool:
            udp_ok, tcp_ok = results
            if udp_ok and tcp_ok:
                log.info("reloaded {path}: {n} listener(s)", path=self.config_path, n=total)
            elif tcp_ok:
                # The TCP side says what did not start itself; the UDP side said which address failed.
                log.error("reloaded {path}, but not every UDP listener it names listens", path=self.config_path)
            return udp_ok and tcp_ok

        changed = defer.gatherResults([udp_reloaded, tcp_reloaded]).addCallback(said)
        self._wait_at_stop(changed)
        return changed

    def privilegedStartService(self) -> None:
        if self._admin is not None:
            self._admin.privilegedStartService()
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        self.draining = False
        if self._admin is not None and not self._admin.running:
            self._admin.startService()
        if self._emfile is None:
            self._emfile = self.metrics.watch_emfile()
        super().startService()  # type: ignore[no-untyped-call]
        if self.handle_signals:
            self.arm_signals()

    def stopService(self) -> defer.Deferred[None]:
        self.draining = True
        factories = [listener.factory for listener in self.listeners.values()]
        self._stopping_factories = factories
        closed_by_reload = sum(len(f.connections) for f in self._draining_old.values())
        if closed_by_reload:
            log.info(
                "stopping: also waiting for {n} connection(s) of listeners a reload closed",
                n=closed_by_reload,
            )
        stopped = defer.maybeDeferred(super().stopService)
        stopped.addCallback(lambda _: self._drain(factories))
        # Listeners a reload closed (or is closing) drain too before the stop ends.
        stopped.addCallback(lambda _: self._background_done())
        stopped.addBoth(self._stop_admin)
        # Our handlers stay in while draining, so that a second SIGTERM cuts
        # the drain short instead of killing the process.
        stopped.addBoth(self._signals_off)
        return stopped

    def _signals_off(self, result: object) -> object:
        self.restore_signals()
        return result

    def stop_now(self) -> None:
        """Abort every connection at once (a second SIGTERM while draining)."""
        self._abort([*self._stopping_factories, *self._draining_old.values()], "stopping now")

    def _stop_admin(self, result: object) -> object:
        if self._emfile is not None:
            self._emfile.stop()
            self._emfile = None
        admin = self._admin
        if admin is None or not admin.running:
            return result
        d = defer.maybeDeferred(admin.stopService)
        d.addCallback(lambda _: result)
        return d

    def _drain(self, factories: list[SniffingFactory]) -> defer.Deferred[None]:
        for f in factories:
            f.abort_sniffing()
        reactor: IReactorTime = self._reactor
        deadline = reactor.callLater(self.shutdown_timeout, self._abort, factories, "shutdown_timeout reached")
        live = [f for f in factories if f.connections]
        if live:
            log.info(
                "waiting up to {timeout}s for {n} connection(s) to finish",
                timeout=self.shutdown_timeout,
                n=sum(len(f.connections) for f in live),
            )
        done = defer.gatherResults([f.when_idle() for f in factories])

        def finished(_: object) -> None:
            if deadline.active():
                deadline.cancel()
            self._release(factories)

        return done.addCallback(finished)

    def _release(self, factories: list[SniffingFactory]) -> None:
        """Stop the factories no running listener uses any more."""
        in_use = {id(listener.factory) for listener in self.listeners.values() if listener.running}
        for f in factories:
            if id(f) in self._held and id(f) not in in_use:
                del self._held[id(f)]
                f.doStop()

    def _abort(self, factories: list[SniffingFactory], why: str) -> None:
        left = sum(len(f.connections) for f in factories)
        if left:
            log.warn("{why}: aborting {n} connection(s)", why=why, n=left)
        for f in factories:
            f.abort_all()
