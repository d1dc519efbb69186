"""`RemotePolicy`: an `atlas-vla serve` server as a `runtime.ChunkPredictor`.

`PolicyRuntime(RemotePolicy("ws://host:8000"))` drives a robot or a simulator exactly as a local
policy does: one connection is one control loop, `reset()` makes the next request start a new
episode on the server, and with temporal context the steps between queries are sent as
observe-only requests so the server's history holds every frame. The wire format is openpi's
(`serving/protocol.py`); openpi's own `WebsocketClientPolicy` works against the same server.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from atlas_vla.serving.protocol import OBSERVE_ONLY, RESET, pack, spec_from_metadata, unpack


class ServerError(RuntimeError):
    """The server refused a request (its text reply)."""


class RemotePolicy:
    """A connection to a policy server at `uri` (`ws://host:port`; a bare `host:port` gets `ws://`)."""

    def __init__(self, uri: str, *, api_key: str | None = None, open_timeout: float = 30.0) -> None:
        from websockets.sync.client import connect

        self.uri = uri if uri.startswith(("ws://", "wss://")) else f"ws://{uri}"
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        self._connection = connect(self.uri, additional_headers=headers, compression=None, max_size=None,
                                   open_timeout=open_timeout)
        self.metadata: dict[str, Any] = unpack(self._connection.recv())
        self.spec = spec_from_metadata(self.metadata)
        self._new_episode = True

    def reset(self) -> None:
        self._new_episode = True

    def _request(self, observation: Mapping[str, Any], **control: bool) -> dict[str, Any]:
        message = {**observation, **control}
        if self._new_episode:
            message[RESET] = True
        self._connection.send(pack(message))
        reply = self._connection.recv()
        if isinstance(reply, str):
            raise ServerError(f"the policy server at {self.uri} refused the request: {reply}")
        self._new_episode = False
        return unpack(reply)

    def observe(self, observation: Mapping[str, Any]) -> None:
        self._request(observation, **{OBSERVE_ONLY: True})

    def predict_chunk(self, observation: Mapping[str, Any]) -> np.ndarray:
        return np.asarray(self._request(observation)["actions"], dtype=np.float64)

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> "RemotePolicy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
