"""`atlas-vla serve`: a websocket policy server speaking openpi's protocol (`serving/protocol.py`).

One `AtlasPolicy` serves every client. Each connection is one control loop with its own
`ObservationHistory` (temporal context), so a client sends `reset: true` with an episode's first
observation, or opens one connection per episode. Requests waiting at the same moment, from any
number of connections, are batched into one forward pass: the batch closes at `max_batch_size`
requests, once every open connection has a request in it (a lone client never waits), or
`max_wait_ms` after its first request. A bad request gets a text reply naming what was
wrong and the connection carries on; no request, malformed message or disconnect affects another
client. `GET /healthz` answers 200 while the server runs. With an API key, websocket connections
without openpi's `Authorization: Api-Key <key>` header are refused (401). Observation contents are
never logged, and nothing is ever unpickled.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Callable, Iterator

import numpy as np

from atlas_vla.data.observations import ObservationHistory, batch_inputs
from atlas_vla.serving.protocol import ProtocolError, pack, parse_request, server_metadata, unpack

logger = logging.getLogger("atlas_vla.serve")
DEFAULT_MAX_MESSAGE_BYTES = 16 * 2**20  # two 1024 x 1024 images are 6 MiB
HEALTH_PATH = "/healthz"


@dataclass
class _Pending:
    inputs: dict[str, Any]
    future: asyncio.Future
    received: float  # perf_counter when the request arrived


class PolicyServer:
    """Serve `policy` (an `AtlasPolicy`, loaded) on `host:port` (port 0: a free port, see `port`).

    `max_batch_size` 1 turns batching off. Messages over `max_message_bytes` get an error reply; over
    four times that, websockets closes that connection (close code 1009, message too big) instead of
    reading it.
    """

    def __init__(self, policy: Any, *, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 8,
                 max_wait_ms: float = 5.0, api_key: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if api_key is not None and not api_key:
            raise ValueError("the API key is empty; give a key or none")
        self.policy = policy.eval()
        self.spec = policy.config.sample_spec
        self.host, self.port = host, port
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_ms / 1000.0
        self.max_message_bytes = max_message_bytes
        self._expected_authorization = f"Api-Key {api_key}".encode() if api_key else None
        self._metadata = pack(server_metadata(policy))
        self._queue: asyncio.Queue[_Pending] | None = None
        self._open_connections = 0

    # --- HTTP: health and authentication ----------------------------------------------------------

    def _process_request(self, connection: Any, request: Any) -> Any:
        if request.path.split("?", 1)[0] == HEALTH_PATH:
            return connection.respond(HTTPStatus.OK, "ok\n")
        if self._expected_authorization is not None:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, self._expected_authorization):
                logger.warning("refused a connection from %s: missing or wrong API key", connection.remote_address)
                return connection.respond(HTTPStatus.UNAUTHORIZED, "an 'Authorization: Api-Key <key>' header with "
                                                                   "this server's key is required\n")
        return None

    # --- one connection ---------------------------------------------------------------------------

    async def _handle(self, connection: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        peer = connection.remote_address
        logger.info("client %s connected", peer)
        history = ObservationHistory(self.spec)
        self._open_connections += 1
        try:
            await connection.send(self._metadata)
            async for message in connection:
                logger.debug("client %s: a request of %d bytes", peer, len(message))
                reply = await self._answer(message, history)
                await connection.send(reply)
        except ConnectionClosed:
            pass
        finally:
            self._open_connections -= 1
            logger.info("client %s disconnected", peer)

    async def _answer(self, message: bytes | str, history: ObservationHistory) -> bytes | str:
        received = time.perf_counter()
        try:
            if isinstance(message, str):
                raise ProtocolError("expected a binary msgpack message, got a text frame")
            if len(message) > self.max_message_bytes:
                raise ProtocolError(f"the message is {len(message)} bytes; this server accepts at most "
                                    f"{self.max_message_bytes} (an observation with camera images of a few hundred "
                                    f"pixels a side is well under 1 MB)")
            observation, reset, observe_only = parse_request(unpack(message), self.spec)
            if reset:
                history.reset()
            history.add(observation)
        except ValueError as error:  # ProtocolError, or the observation transforms' own check
            logger.info("bad request (%s)", type(error).__name__)  # its text may quote observation values
            return f"bad request: {error}"
        if observe_only:
            return pack({"observed": True, "server_timing": {"infer_ms": 0.0, "queue_ms": 0.0, "batch_size": 0}})
        assert self._queue is not None
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(history.model_inputs(), future, received))
        try:
            actions, timing = await future
        except Exception as error:
            logger.error("inference failed: %s", type(error).__name__)
            return f"inference failed: {type(error).__name__}: {error}"
        return pack({"actions": actions, "server_timing": timing})

    # --- batching ---------------------------------------------------------------------------------

    async def _next_batch(self) -> list[_Pending]:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait_s
        # a client waits for its reply before its next request, so once every open connection has a request
        # in the batch no other can come: waiting longer would only add latency (e.g. to a lone client)
        while len(batch) < min(self.max_batch_size, max(self._open_connections, 1)):
            try:
                left = deadline - loop.time()
                batch.append(self._queue.get_nowait() if left <= 0 else await asyncio.wait_for(self._queue.get(), left))
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
        return batch

    def _predict(self, inputs: list[dict[str, Any]]) -> np.ndarray:
        return self.policy.predict_action_chunk(batch_inputs(inputs)).cpu().numpy().astype(np.float32)

    async def _run_batches(self) -> None:
        while True:
            batch = await self._next_batch()
            started = time.perf_counter()
            try:
                chunks = await asyncio.to_thread(self._predict, [item.inputs for item in batch])
                results: list[Any] = list(chunks)
            except Exception:  # find the request that fails, so that only its client gets the error
                results = []
                for item in batch:
                    try:
                        results.append((await asyncio.to_thread(self._predict, [item.inputs]))[0])
                    except Exception as error:
                        results.append(error)
            infer_ms = 1000.0 * (time.perf_counter() - started)
            for item, result in zip(batch, results):
                if item.future.done():  # the connection went away
                    continue
                if isinstance(result, Exception):
                    item.future.set_exception(result)
                else:
                    timing = {"infer_ms": infer_ms, "queue_ms": 1000.0 * (started - item.received),
                              "batch_size": len(batch)}
                    item.future.set_result((result, timing))

    # --- running ----------------------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event, on_ready: Callable[[int], None] | None = None) -> None:
        """Serve until `stop` is set; `on_ready(port)` once listening."""
        from websockets.asyncio.server import serve

        self._queue = asyncio.Queue()
        batcher = asyncio.create_task(self._run_batches())
        try:
            async with serve(self._handle, self.host, self.port, process_request=self._process_request,
                             max_size=4 * self.max_message_bytes, compression=None) as server:
                self.port = server.sockets[0].getsockname()[1]
                if on_ready is not None:
                    on_ready(self.port)
                await stop.wait()
        finally:
            batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await batcher

    def run(self, on_ready: Callable[[int], None] | None = None) -> None:
        """Serve in this thread until SIGINT or SIGTERM."""
        import signal

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await self.serve(stop, on_ready)

        asyncio.run(main())


@contextlib.contextmanager
def serve_in_background(policy: Any, **kwargs: Any) -> Iterator[PolicyServer]:
    """Run a `PolicyServer` (same arguments) in a background thread while the block runs; its `port` is
    the bound one. The server stops, and its thread ends, when the block exits."""
    server = PolicyServer(policy, **kwargs)
    ready = threading.Event()
    failed: list[BaseException] = []
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def run() -> None:
        try:
            loop.run_until_complete(server.serve(stop, lambda port: ready.set()))
        except BaseException as error:  # e.g. the port is taken: reported to the caller below
            failed.append(error)
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="atlas-vla-serve", daemon=True)
    thread.start()
    ready.wait()
    if failed:
        thread.join()
        raise failed[0]
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join()
