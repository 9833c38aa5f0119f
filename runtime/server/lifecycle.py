"""``toolcell serve`` as a long-running process: signals, reload, telemetry, state file.

    SIGTERM / SIGINT  NOT_SERVING, stop accepting, let calls finish within ``server.shutdown_grace``,
                      cancel the rest (status killed), remove every sandbox, exit 0
    SIGHUP            reload the config file: validated completely first; if invalid, the running config
                      stays and the error is logged; in-flight calls finish under the config they began with

Settings that shape the process itself (``server``: listen address, socket mode, instance label, state
file; ``telemetry``) need a restart: a reload keeps the running values and logs which keys it ignored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
import time
from pathlib import Path

from toolcell import metrics
from toolcell.backends.factory import open_backend
from toolcell.control import State, write_state
from toolcell.errors import ToolcellError
from toolcell.server.app import App
from toolcell.settings import Config, load_config
from toolcell.supervisor import Supervisor
from toolcell.telemetry import install_log_redaction, setup_logging, setup_metrics, setup_tracing

log = logging.getLogger("toolcell.lifecycle")


class Reloader:
    def __init__(self, app: App, config_path: str | None, listen: str | None) -> None:
        self.app = app
        self.config_path = config_path
        self.listen = listen
        self.state = State(pid=os.getpid(), config=app.supervisor.config.source)
        self._lock = asyncio.Lock()

    @property
    def state_file(self) -> str:
        return self.app.supervisor.config.server.state_file

    def publish(self) -> None:
        try:
            write_state(self.state_file, self.state)
        except OSError as exc:
            log.warning("cannot write state file %s: %s", self.state_file, exc.strerror)

    async def reload(self) -> bool:
        """Load, validate, swap. On any error the running config stays; returns whether it was taken."""
        async with self._lock:
            supervisor = self.app.supervisor
            current = supervisor.config
            error = ""
            try:
                loaded = await asyncio.to_thread(load_config, self.config_path, listen=self.listen)
                kept = [section for section in ("server", "telemetry")
                        if getattr(loaded, section) != getattr(current, section)]
                config = dataclasses.replace(loaded, server=current.server, telemetry=current.telemetry)
                await supervisor.reload(config)
            except ToolcellError as exc:
                error = str(exc)
            ok = not error
            if ok:
                if kept:
                    log.warning("config reloaded; changes under %s need a restart and were not applied",
                                " and ".join(kept))
                log.info("config reloaded from %s: %d profiles, %d tools", config.source, len(config.profiles),
                         len(supervisor.config.tools))
            else:
                log.error("config reload refused, keeping the running config: %s", error)
            metrics.reloads.add(1, {"outcome": "ok" if ok else "error"})
            self.state = dataclasses.replace(self.state, reloads=self.state.reloads + 1, last_reload_ok=ok,
                                             last_reload_error=error, last_reload_at=time.time())
            self.publish()
        if ok:
            await self.app.monitor.check_now()  # the new tools' images may be missing
        return ok


async def serve(config_path: str | None, listen: str | None, verbose: bool = False) -> int:
    config: Config = load_config(config_path, listen=listen)
    setup_logging(config.telemetry.log_format, verbose)
    tracing = setup_tracing(config.telemetry)
    meters = setup_metrics(config.telemetry)
    backend = open_backend(config)
    supervisor = Supervisor(config, backend)
    install_log_redaction(supervisor)
    app = App(supervisor)
    meters.set_health(app.monitor.health)  # the Prometheus listener's /healthz
    try:
        address = await app.start()
    except BaseException:
        await backend.close()
        meters.shutdown()
        raise
    reloader = Reloader(app, config_path, listen)
    reloader.publish()
    live = supervisor.config  # with the tools its MCP servers were found to have
    failed = "".join(f"; server {name!r} failed: see the log" for name in sorted(supervisor.source_errors))
    print(f"toolcell: serving on {address} (config {config.source}, {len(live.tools)} tools{failed})",
          file=sys.stderr, flush=True)
    stop = asyncio.Event()
    reloads: set[asyncio.Task[bool]] = set()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def on_hup() -> None:
        task = asyncio.ensure_future(reloader.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    await stop.wait()
    print("toolcell: shutting down", file=sys.stderr, flush=True)
    loop.remove_signal_handler(signal.SIGHUP)
    await app.stop()
    await asyncio.to_thread(Path(reloader.state_file).unlink, missing_ok=True)
    meters.shutdown()
    tracing.shutdown()
    log.info("stopped")
    return 0
