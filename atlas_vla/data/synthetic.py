"""A small, learnable LIBERO-format dataset: the data of the offline demo and of the tests.

Each scene shows a red and a blue block on a grey table and the end effector as a white disc that
starts near the centre; the instruction names the block to reach. The expert moves the effector
straight towards the named block (position deltas proportional to the remaining distance, saturating at +-1) and closes the
gripper once it is there. So the actions are determined by what the cameras show and what the
instruction says: a policy that reads both beats the mean-action baseline by a wide margin, one that
ignores the instruction cannot. Written in the LeRobot v2 layout of `physical-intelligence/libero`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from atlas_vla.action_layout import GRIPPER_CLOSE, GRIPPER_OPEN
from atlas_vla.data.lerobot_writer import LeRobotV2Writer

INSTRUCTIONS = ("reach the red block and grasp it", "reach the blue block and grasp it")
_COLORS = np.array([[220, 40, 40], [40, 70, 230]], dtype=np.uint8)
_TABLE = np.array([120, 110, 100], dtype=np.uint8)
_GAIN = 4.0  # action = clip(gain * (target - effector)): saturated far away, proportional near the goal
_STEP = 0.05  # effector displacement per unit action, in table widths
_REACHED = 0.06  # distance at which the gripper closes
_HOLD_FRAMES = 4  # frames with the gripper closed at the end of each episode


def _render(size: int, blocks: np.ndarray, effector: np.ndarray, gripper_closed: bool) -> np.ndarray:
    """Top-down agent view: table, two blocks, effector disc (filled when the gripper is closed)."""
    ys, xs = np.mgrid[0:size, 0:size] / size
    image = np.broadcast_to(_TABLE, (size, size, 3)).copy()
    half = 0.07
    for color, (bx, by) in zip(_COLORS, blocks):
        image[(abs(xs - bx) < half) & (abs(ys - by) < half)] = color
    distance = np.hypot(xs - effector[0], ys - effector[1])
    image[(distance < 0.05) & ((distance > 0.03) | gripper_closed)] = 255
    return image


def _wrist(agent_view: np.ndarray, effector: np.ndarray) -> np.ndarray:
    """Eye-in-hand view: a 2x zoom of the agent view centred on the effector."""
    size = agent_view.shape[0]
    centre = (effector * size).astype(int)
    padded = np.pad(agent_view, ((size // 4, size // 4), (size // 4, size // 4), (0, 0)), mode="edge")
    crop = padded[centre[1]: centre[1] + size // 2, centre[0]: centre[0] + size // 2]
    return crop.repeat(2, axis=0).repeat(2, axis=1)


def _episode(rng: np.random.Generator, size: int, task: int, max_frames: int):
    """One expert episode: (images, wrist images, states, actions)."""
    blocks = rng.uniform(0.15, 0.85, size=(2, 2))
    while np.hypot(*(blocks[0] - blocks[1])) < 0.3:
        blocks[1] = rng.uniform(0.15, 0.85, size=2)
    effector = 0.5 + rng.uniform(-0.05, 0.05, size=2)  # starts near the table centre
    target = blocks[task]
    images, wrists, states, actions = [], [], [], []
    closed_for = 0
    while len(actions) < max_frames and closed_for < _HOLD_FRAMES:
        delta = np.clip(_GAIN * (target - effector), -1.0, 1.0)
        close = np.hypot(*(target - effector)) < _REACHED
        gripper = GRIPPER_CLOSE if close else GRIPPER_OPEN
        image = _render(size, blocks, effector, closed_for > 0)
        images.append(image)
        wrists.append(_wrist(image, effector))
        finger = 0.01 if closed_for > 0 else 0.04
        states.append([effector[0], effector[1], 0.1, 0.0, 0.0, 0.0, finger, -finger])
        actions.append([delta[0], delta[1], 0.0, 0.0, 0.0, 0.0, gripper])
        effector = np.clip(effector + _STEP * delta * (not close), 0.0, 1.0)
        closed_for += int(close)
    return (np.stack(images), np.stack(wrists), np.asarray(states, np.float32), np.asarray(actions, np.float32))


def make_synthetic_libero(output: str | Path, *, num_episodes: int = 160, seed: int = 0, image_size: int = 96,
                          max_frames: int = 40, overwrite: bool = False) -> Path:
    """Write `num_episodes` expert episodes (alternating the two instructions) to `output`; deterministic."""
    if num_episodes < 2:
        raise ValueError(f"num_episodes must be at least 2 (one per instruction), got {num_episodes}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    rng = np.random.default_rng(seed)
    writer = LeRobotV2Writer(output, fps=20, overwrite=overwrite)
    try:
        for index in range(num_episodes):
            task = index % len(INSTRUCTIONS)
            images, wrists, states, actions = _episode(rng, image_size, task, max_frames)
            writer.add_episode(images, wrists, states, actions, INSTRUCTIONS[task])
        return writer.close()
    except BaseException:
        writer.abort()
        raise
