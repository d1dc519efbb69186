"""`atlas-vla serve` against the real `openpi-client` package and raw websocket clients: metadata,
actions equal to `AtlasPolicy.predict_action`, batching across concurrent clients, bad requests that
get an error reply while everyone else is served, killed clients, the API key, /healthz, and temporal
context kept per connection."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import synthetic_dataset, tiny_policy_config
from openpi_client import websocket_client_policy  # installed by the README's install command

from atlas_vla.data.normalization import compute_norm_stats
from atlas_vla.data.sources import load_libero
from atlas_vla.models.policy import AtlasPolicy
from atlas_vla.runtime import PolicyRuntime
from atlas_vla.serving.client import RemotePolicy, ServerError
from atlas_vla.serving.protocol import pack, unpack
from atlas_vla.serving.server import serve_in_background

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stats(tmp_path_factory):
    return compute_norm_stats(load_libero(str(synthetic_dataset(tmp_path_factory.mktemp("data")))))


@pytest.fixture(scope="module")
def policy(stats):
    torch.manual_seed(0)
    return AtlasPolicy(tiny_policy_config(), stats).eval()


@pytest.fixture(scope="module")
def observation(observation_file):
    with np.load(observation_file) as data:
        observation = {key: data[key] for key in data.files}
    observation["task_description"] = str(observation["task_description"])
    return observation


def variant(observation, seed: int) -> dict:
    """Another plausible observation: shifted images, a nudged state and another instruction."""
    rng = np.random.default_rng(seed)
    return {"agentview_image": np.roll(observation["agentview_image"], 7 * seed, axis=1),
            "wrist_image": np.roll(observation["wrist_image"], -5 * seed, axis=0),
            "state": observation["state"] + rng.normal(0, 0.01, 8),
            "task_description": f"{observation['task_description']} (variant {seed})"}


def openpi_keys(observation) -> dict:
    """The observation in openpi's LIBERO example keys."""
    return {"observation/image": observation["agentview_image"], "observation/wrist_image": observation["wrist_image"],
            "observation/state": observation["state"].astype(np.float32), "prompt": observation["task_description"]}


class ServeProcess:
    """`atlas-vla serve` in a subprocess on a free localhost port; always stopped."""

    def __init__(self, folder: Path, *extra: str, env: dict | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "atlas_vla.cli", "serve", "--policy", str(folder), "--port", "0", *extra],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
        self.output: list[str] = []
        for line in self.process.stdout:
            self.output.append(line)
            if " on ws://" in line:
                self.port = int(line.split(" on ws://127.0.0.1:")[1].split()[0])
                break
        else:
            raise AssertionError("the server did not start:\n" + "".join(self.output))

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=60)
        finally:
            self.process.kill()
        self.output.append(self.process.stdout.read())
        return code


def test_openpi_client_gets_the_policys_actions_from_atlas_vla_serve(policy, observation, tmp_path):
    folder = policy.save_pretrained(tmp_path / "policy")
    expected = AtlasPolicy.from_pretrained(folder).predict_action(observation)
    server = ServeProcess(folder)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=30) as response:
            assert response.status == 200 and response.read() == b"ok\n"
        client = websocket_client_policy.WebsocketClientPolicy("127.0.0.1", server.port)
        metadata = client.get_server_metadata()
        assert metadata["action_horizon"] == 4 and metadata["action_dim"] == 7 and metadata["image_size"] == 56
        assert metadata["cameras"] == ["agentview_image", "wrist_image"]
        assert metadata["norm_stats_fingerprint"] == policy.norm_stats.fingerprint
        assert metadata["backbones"] == policy.backbone_references()
        assert metadata["observation"]["state"]["shape"] == [8] and metadata["atlas_vla_version"]
        for request in (observation, openpi_keys(observation)):
            reply = client.infer(request)
            assert reply["actions"].shape == (4, 7) and reply["actions"].dtype == np.float32
            np.testing.assert_array_equal(reply["actions"].astype(np.float64), expected)
            assert set(reply["server_timing"]) == {"infer_ms", "queue_ms", "batch_size"}
        client._ws.close()
    finally:
        assert server.stop() == 0
    log = "".join(server.output)
    # the one websocket connection is logged when it opens and when it closes, by its address
    opened = re.findall(r" atlas_vla\.serve: client (\('127\.0\.0\.1', \d+\)) connected$", log, flags=re.M)
    closed = re.findall(r" atlas_vla\.serve: client (\('127\.0\.0\.1', \d+\)) disconnected$", log, flags=re.M)
    assert len(opened) == 1 and closed == opened, log
    assert observation["task_description"] not in log  # no observation content is logged


def test_the_api_key_is_required_when_set_and_never_printed(policy, observation, tmp_path):
    from websockets.exceptions import InvalidStatus

    folder = policy.save_pretrained(tmp_path / "policy")
    key = "k3y-for-this-test-only"
    server = ServeProcess(folder, env={"ATLAS_VLA_API_KEY": key})
    try:
        with pytest.raises(InvalidStatus, match="401"):
            websocket_client_policy.WebsocketClientPolicy("127.0.0.1", server.port)
        with pytest.raises(InvalidStatus, match="401"):
            websocket_client_policy.WebsocketClientPolicy("127.0.0.1", server.port, api_key="wrong")
        client = websocket_client_policy.WebsocketClientPolicy("127.0.0.1", server.port, api_key=key)
        assert client.infer(observation)["actions"].shape == (4, 7)
        client._ws.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=30) as response:
            assert response.status == 200  # health probes need no key
    finally:
        assert server.stop() == 0
    assert key not in "".join(server.output) and "API key required" in "".join(server.output)


def test_concurrent_clients_are_batched_and_a_bad_request_hurts_nobody(policy, observation):
    observations = [variant(observation, seed) for seed in range(4)]
    expected = [policy.predict_action(o) for o in observations]
    # a long wait so the four requests of a round share one forward pass however busy the machine is
    with serve_in_background(policy, port=0, max_batch_size=4, max_wait_ms=3000) as server:
        clients = [websocket_client_policy.WebsocketClientPolicy("127.0.0.1", server.port) for _ in range(4)]
        barrier = threading.Barrier(4)

        def round_of(requests: list[dict]) -> list:
            """The four replies of one round (a fresh list: a round that hangs cannot pass on earlier replies)."""
            replies: list = [None] * len(requests)

            def ask(i: int, request: dict) -> None:
                barrier.wait()
                try:
                    replies[i] = clients[i].infer(request)
                except Exception as error:  # openpi's client raises the server's text reply
                    replies[i] = error

            threads = [threading.Thread(target=ask, args=(i, r), daemon=True) for i, r in enumerate(requests)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
            assert not any(thread.is_alive() for thread in threads), "a client got no reply within 120 s"
            assert all(reply is not None for reply in replies)
            return replies

        first = round_of(observations)
        for reply, want in zip(first, expected):
            np.testing.assert_allclose(reply["actions"], want, atol=1e-5)  # batched equals unbatched
        assert max(reply["server_timing"]["batch_size"] for reply in first) >= 2
        bad = {k: v for k, v in observations[0].items() if k != "state"}
        second = round_of([bad, *observations[1:]])
        assert isinstance(second[0], RuntimeError)
        assert "missing 'state' (or 'observation/state')" in str(second[0])
        for reply, want in zip(second[1:], expected[1:]):
            np.testing.assert_allclose(reply["actions"], want, atol=1e-5)
        np.testing.assert_allclose(clients[0].infer(observations[0])["actions"], expected[0], atol=1e-5)
        for client in clients:
            client._ws.close()


def test_malformed_and_oversized_messages_get_error_replies_on_a_connection_that_carries_on(policy, observation):
    from websockets.sync.client import connect

    valid = pack(observation)
    bad_bytes = {b"__ndarray__": True, b"data": b"\x00" * 10, b"dtype": "<f4", b"shape": [8]}  # 10 bytes, not 32
    cases = [
        ("a text frame", "expected a binary msgpack message"),
        (b"\xc1\xff not msgpack", "not valid msgpack"),
        (pack({"state": [1.0]})[:5], "not valid msgpack"),
        (b"\x93\x01\x02\x03", "must be a map of observation keys"),
        (pack({**observation, "agentview_image": observation["agentview_image"][:32, :32].astype(np.float32)}),
         "'agentview_image' must be an upright (H, W, 3) uint8 image"),
        (pack({**observation, "wrist_image": observation["wrist_image"][..., :2].copy()}),
         "'wrist_image' must be an upright (H, W, 3) uint8 image"),
        (pack({**observation, "state": np.zeros(7)}), "'state' must be a (8,) numeric array"),
        (pack({**observation, "state": np.full(8, np.nan)}), "'state' holds non-finite values"),
        (pack({**observation, "task_description": 3}), "'task_description' must be a non-empty string"),
        (pack({**openpi_keys(observation), "state": observation["state"]}), "has both 'state' and 'observation/state'"),
        (pack({**observation, "reset": "yes"}), "'reset' must be true or false"),
        (pack({**observation, "padding": np.zeros(len(valid), np.uint8)}),
         f"this server accepts at most {len(valid) + 100}"),
    ]
    with serve_in_background(policy, port=0, max_message_bytes=len(valid) + 100) as server:
        with connect(f"ws://127.0.0.1:{server.port}", max_size=None) as connection:
            unpack(connection.recv())  # metadata
            connection.send(pack({**observation, "state": bad_bytes}))
            reply = connection.recv()
            assert isinstance(reply, str) and "does not match its 10 data bytes" in reply
            for message, error in cases:
                connection.send(message)
                reply = connection.recv()
                assert isinstance(reply, str) and error in reply, (error, reply)
            connection.send(valid)
            answer = unpack(connection.recv())
            np.testing.assert_array_equal(answer["actions"], policy.predict_action(observation).astype(np.float32))


def test_a_client_killed_mid_request_does_not_stop_the_server(policy, observation, tmp_path):
    from websockets.sync.client import connect

    script = (
        "import sys, numpy as np\n"
        "from openpi_client.websocket_client_policy import WebsocketClientPolicy\n"
        f"client = WebsocketClientPolicy('127.0.0.1', int(sys.argv[1]))\n"
        f"obs = dict(np.load({str(tmp_path / 'obs.npz')!r}))\n"
        "obs['task_description'] = str(obs['task_description'])\n"
        "client.infer(obs)\n")
    np.savez(tmp_path / "obs.npz", **observation)
    received = threading.Event()  # the server has read the killed client's request (its debug line)

    class Requests(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "a request of" in record.getMessage():
                received.set()

    server_log = logging.getLogger("atlas_vla.serve")
    handler, level = Requests(level=logging.DEBUG), server_log.level
    server_log.addHandler(handler)
    server_log.setLevel(logging.DEBUG)
    # an idle second connection holds the request in its batch for up to 60 s (a batch closes early only once
    # every open connection has a request in it), so it is still unanswered when the client is killed
    try:
        with serve_in_background(policy, port=0, max_batch_size=2, max_wait_ms=60_000) as server, \
                connect(f"ws://127.0.0.1:{server.port}") as idle:
            idle.recv()  # its metadata
            killed = subprocess.Popen([sys.executable, "-c", script, str(server.port)])
            try:
                assert received.wait(timeout=120), "the client's request never reached the server"
                killed.send_signal(signal.SIGKILL)
            finally:
                killed.kill()
                killed.wait()
            assert killed.returncode == -signal.SIGKILL  # it died with its request in flight, not after a reply
            received.clear()
            idle.send(pack(observation))  # completes the held batch: the dead client's reply has nobody to go to
            np.testing.assert_allclose(unpack(idle.recv())["actions"], policy.predict_action(observation), atol=1e-5)
            with connect(f"ws://127.0.0.1:{server.port}") as abandoned:  # a request, and gone before the reply
                abandoned.recv()
                abandoned.send(pack(observation))
            idle.close()
            client = websocket_client_policy.WebsocketClientPolicy("127.0.0.1", server.port)
            reply = client.infer(observation)
            # (possibly batched with the abandoned request, hence a float tolerance)
            np.testing.assert_allclose(reply["actions"], policy.predict_action(observation), atol=1e-5)
            # the gone connections are no longer counted: the lone client's next request is a batch of its own,
            # sent off without waiting the 60 s window for requests from them
            timing = client.infer(observation)["server_timing"]
            assert timing["batch_size"] == 1 and timing["queue_ms"] < 30_000
            client._ws.close()
    finally:
        server_log.removeHandler(handler)
        server_log.setLevel(level)


def test_temporal_context_is_kept_per_connection_and_reset_per_episode(stats, observation):
    torch.manual_seed(0)
    policy = AtlasPolicy(tiny_policy_config(num_temporal_frames=2, temporal_stride=2), stats).eval()
    episodes = [[variant(observation, seed) for seed in range(start, start + 7)] for start in (0, 10)]
    local = PolicyRuntime(policy, replan_steps=3)
    with serve_in_background(policy, port=0) as server:
        remote_policy = RemotePolicy(f"127.0.0.1:{server.port}")
        remote = PolicyRuntime(remote_policy, replan_steps=3)
        other = websocket_client_policy.WebsocketClientPolicy("127.0.0.1", server.port)
        for episode in episodes:  # the second episode starts with a reset on the same connection
            local.reset()
            remote.reset()
            for step, frame in enumerate(episode):
                np.testing.assert_allclose(remote.select_action(frame), local.select_action(frame), atol=1e-5)
                # another connection's requests never enter this connection's history
                other.infer({**variant(observation, 50 + step), "reset": step == 0})
        # openpi's client starts an episode with reset: the first frame is then the only frame
        first = episodes[0][0]
        np.testing.assert_allclose(other.infer({**first, "reset": True})["actions"], policy.predict_action(first),
                                   atol=1e-5)
        with pytest.raises(ServerError, match="must be an upright"):
            remote_policy.predict_chunk({**first, "agentview_image": np.zeros((4, 4), np.uint8)})
        remote_policy.close()
        other._ws.close()
