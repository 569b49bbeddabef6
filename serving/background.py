"""A server with its own asyncio event loop in a daemon thread: the HTTP and gRPC fronts of `shoprec serve`."""

from __future__ import annotations

import asyncio
import threading


class BackgroundServer:
    """Subclasses implement `_serve()`: listen, call `self._ready.set()`, then `await self._stop_event.wait()` and
    close what they opened. start() returns once it listens (or raises what stopped it); stop() ends it."""

    name = "server"

    def __init__(self):
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop_event: asyncio.Event | None = None

    def start(self, timeout_s: float = 30.0):
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            self.stop()
            raise RuntimeError(f"{self.name}: not listening after {timeout_s:.0f}s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running() and self._stop_event is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)  # this thread's loop: the shutdown's gather() below looks it up
        try:
            self._stop_event = asyncio.Event()
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - handed to start()
            self._error = exc
            self._ready.set()
        finally:  # connections still open: their handler tasks end here, not at interpreter exit
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    async def _serve(self) -> None:
        raise NotImplementedError
