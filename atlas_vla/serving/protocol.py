"""The policy server's wire protocol: openpi's, so `openpi_client.WebsocketClientPolicy` talks to it unchanged.

- Messages are msgpack. A numpy array travels as a map `{b"__ndarray__": True, b"data": raw bytes,
  b"dtype": dtype string, b"shape": [...]}` (openpi's `msgpack_numpy` layout). Decoding builds arrays
  from the raw bytes of number and fixed-width text dtypes only and checks that the bytes fit the
  shape: nothing is ever unpickled, and object arrays do not exist on the wire.
- On connect the server sends one binary message, the metadata (`server_metadata`).
- A request is a map of observation keys: Atlas's (`agentview_image`, `wrist_image`, `state`,
  `task_description`) or openpi's LIBERO example keys (`observation/image`, `observation/wrist_image`,
  `observation/state`, `prompt`). Two optional control keys: `reset: true` starts a new episode on
  this connection (forgets its frame history) before the observation is taken; `observe_only: true`
  records the frame without predicting (temporal context on steps between queries).
- A reply is a binary map: `actions` float32 (action_horizon, 7) in LIBERO units and `server_timing`
  (`infer_ms`, `queue_ms`, `batch_size`); an observe-only request gets `observed: true` instead of
  actions. A request that cannot be served gets a text frame naming what was wrong and what was
  expected (openpi's client raises it as an error); the connection stays open.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import msgpack
import numpy as np

from atlas_vla.action_layout import ACTION_DIM
from atlas_vla.constants import OBSERVATION_KEYS, STATE_DIM
from atlas_vla.data.spec import SampleSpec

# openpi's LIBERO example keys -> Atlas's observation keys
OPENPI_KEYS = {"observation/image": "agentview_image", "observation/wrist_image": "wrist_image",
               "observation/state": "state", "prompt": "task_description"}
API_KEY_ENV = "ATLAS_VLA_API_KEY"  # where `atlas-vla serve` and eval-libero --server read the API key
RESET = "reset"
OBSERVE_ONLY = "observe_only"
MAX_IMAGE_SIDE = 1024  # larger camera images are refused: the policy resizes to a few hundred pixels anyway
_WIRE_KINDS = "biufSU"  # bool, integers, floats, fixed-width text: the only dtypes decoded from the wire


class ProtocolError(ValueError):
    """A message that cannot be served; its text is the error reply."""


def _encode(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in _WIRE_KINDS:
            raise TypeError(f"cannot send a numpy array of dtype {value.dtype}: numbers and fixed-width text only")
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(value).tobytes(), b"dtype": value.dtype.str,
                b"shape": list(value.shape)}
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot send a {type(value).__name__}")


def pack(message: Mapping[str, Any]) -> bytes:
    """msgpack bytes of a map whose values are numpy arrays, numbers, strings, lists or maps."""
    return msgpack.packb(message, default=_encode, use_bin_type=True)


def _decode(value: dict) -> Any:
    if b"__ndarray__" in value:
        try:
            dtype = np.dtype(value[b"dtype"])
            shape = tuple(int(n) for n in value[b"shape"])
            data = value[b"data"]
        except (KeyError, TypeError, ValueError) as error:
            raise ProtocolError(f"malformed array in the message ({error}); expected openpi's msgpack_numpy layout "
                                f"{{__ndarray__, data, dtype, shape}}") from None
        if dtype.kind not in _WIRE_KINDS or dtype.hasobject:
            raise ProtocolError(f"array dtype {dtype} is not accepted; expected numbers (uint8 images, float state) "
                                f"or text")
        if any(n < 0 for n in shape) or not isinstance(data, bytes) or len(data) != math.prod(shape) * dtype.itemsize:
            raise ProtocolError(f"array of shape {shape} and dtype {dtype} does not match its {len(data)} data bytes")
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()  # writable, as torch wants
    if b"__npgeneric__" in value:
        return value.get(b"data")
    return value


def unpack(data: bytes) -> Any:
    """Decode a msgpack message (numpy arrays of numeric dtypes rebuilt, read-only); `ProtocolError` if malformed."""
    try:
        return msgpack.unpackb(data, object_hook=_decode, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as error:  # msgpack's own ExtraData, FormatError, StackError, UnicodeDecodeError ...
        raise ProtocolError(f"the message is not valid msgpack ({type(error).__name__}: {error})") from None


def _flag(request: Mapping[str, Any], key: str) -> bool:
    value = request.get(key, False)
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    if not isinstance(value, (bool, np.bool_)):
        raise ProtocolError(f"{key!r} must be true or false, got {type(value).__name__}")
    return bool(value)


def parse_request(request: Any, spec: SampleSpec) -> tuple[dict[str, Any], bool, bool]:
    """(observation in Atlas's keys, reset, observe_only) of a decoded request, checked against what a
    policy with `spec` needs; `ProtocolError` names the key, what it got and what was expected."""
    if not isinstance(request, dict):
        raise ProtocolError(f"a request must be a map of observation keys, got a msgpack {type(request).__name__}")
    request = {(k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)): v for k, v in request.items()}
    needed = [key for key in OBSERVATION_KEYS if key != "wrist_image" or spec.use_wrist_camera]
    aliases = {atlas: wire for wire, atlas in OPENPI_KEYS.items()}
    observation: dict[str, Any] = {}
    missing = []
    for key in needed:
        names = [name for name in (key, aliases[key]) if name in request]
        if not names:
            missing.append(f"{key!r} (or {aliases[key]!r})")
        elif len(names) == 2:
            raise ProtocolError(f"the request has both {key!r} and {aliases[key]!r}; send one of them")
        else:
            observation[key] = (names[0], request[names[0]])
    if missing:
        raise ProtocolError(f"the request is missing {', '.join(missing)}; found keys {sorted(request)}")
    checked = {}
    for key, (name, value) in observation.items():
        if key == "task_description":
            if isinstance(value, np.ndarray) and value.dtype.kind in "SU" and value.size == 1:
                value = str(value.item())
            if not isinstance(value, str) or not value.strip():
                raise ProtocolError(f"{name!r} must be a non-empty string (the instruction), "
                                    f"got {type(value).__name__}")
        elif key == "state":
            value = np.asarray(value) if isinstance(value, (list, tuple)) else value
            if not isinstance(value, np.ndarray) or value.dtype.kind not in "iuf" or value.shape != (STATE_DIM,):
                raise ProtocolError(f"{name!r} must be a ({STATE_DIM},) numeric array [eef_pos (3), eef axis-angle "
                                    f"(3), gripper qpos (2)], got {_describe(value)}")
            if not np.isfinite(value).all():
                raise ProtocolError(f"{name!r} holds non-finite values: {value.tolist()}")
        else:
            if (not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != 3 or value.shape[2] != 3
                    or not 0 < max(value.shape[:2]) <= MAX_IMAGE_SIDE or min(value.shape[:2]) < 1):
                raise ProtocolError(f"{name!r} must be an upright (H, W, 3) uint8 image with sides of 1 to "
                                    f"{MAX_IMAGE_SIDE} pixels, got {_describe(value)}")
        checked[key] = value
    return checked, _flag(request, RESET), _flag(request, OBSERVE_ONLY)


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


def server_metadata(policy: Any) -> dict[str, Any]:
    """What a client needs to know before its first request (sent on connect)."""
    from atlas_vla import __version__

    spec: SampleSpec = policy.config.sample_spec
    cameras = ["agentview_image"] + (["wrist_image"] if spec.use_wrist_camera else [])
    observation = {key: {"shape": ["H", "W", 3], "dtype": "uint8", "openpi_key": wire}
                   for wire, key in OPENPI_KEYS.items() if key in cameras}
    observation["state"] = {"shape": [STATE_DIM], "dtype": "float32", "openpi_key": "observation/state",
                            "layout": "eef_pos (3), eef axis-angle (3), gripper qpos (2)"}
    observation["task_description"] = {"shape": [], "dtype": "str", "openpi_key": "prompt"}
    return {
        "policy": "atlas",
        "atlas_vla_version": __version__,
        "action_horizon": spec.action_horizon,
        "action_dim": ACTION_DIM,
        "action_layout": ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"],
        "action_units": "LIBERO end-effector deltas (position, axis-angle rotation) as the LIBERO controller "
                        "takes them; gripper -1 open, +1 close",
        "observation": observation,
        "cameras": cameras,
        "image_size": spec.image_size,
        "images": "upright (rotated 180 degrees from LIBERO's raw render), any size up to "
                  f"{MAX_IMAGE_SIDE} px a side, resized to image_size",
        "num_temporal_frames": spec.num_temporal_frames,
        "temporal_stride": spec.temporal_stride,
        "use_wrist_camera": spec.use_wrist_camera,
        "control_keys": {RESET: "true on an episode's first request", OBSERVE_ONLY: "record a frame, no actions"},
        "backbones": policy.backbone_references(),
        "norm_stats_fingerprint": policy.norm_stats.fingerprint,
    }


def spec_from_metadata(metadata: Mapping[str, Any]) -> SampleSpec:
    """The `SampleSpec` a server's metadata describes (what `RemotePolicy` builds its requests for)."""
    try:
        return SampleSpec(int(metadata["image_size"]), bool(metadata["use_wrist_camera"]),
                          int(metadata["num_temporal_frames"]), int(metadata["temporal_stride"]),
                          int(metadata["action_horizon"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ProtocolError(f"the server's metadata is not an Atlas server's: {error!r}") from None
