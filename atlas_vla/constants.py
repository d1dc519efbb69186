"""Names shared by the data pipeline, the policy and the evaluation.

Two families of names live here. *Columns* are the canonical columns of the `datasets.Dataset`
that every LIBERO source (Hub id, LeRobot v2/v3 folder, saved dataset, converted HDF5) is mapped
to, one row per frame. *Batch keys* are the keys of the dict a training sample (and, at inference,
an observation) becomes once the sample transforms have run; the policy reads only these.
Everything is in LIBERO units: the policy normalises internally with its stored statistics, so the
same raw values flow through training, validation and the simulator.
"""

# --- canonical dataset columns (one row per frame) ---
AGENT_IMAGE = "observation.images.agentview"  # third-person camera, upright (Hub convention), PIL/uint8 HWC
WRIST_IMAGE = "observation.images.wrist"  # eye-in-hand camera, upright, PIL/uint8 HWC
STATE = "observation.state"  # float32[8]: eef pos (3), eef axis-angle (3), gripper qpos (2)
ACTION = "action"  # float32[7]: see atlas_vla.action_layout
INSTRUCTION = "instruction"  # natural-language task description
EPISODE_INDEX = "episode_index"
FRAME_INDEX = "frame_index"
TASK_INDEX = "task_index"
SOURCE_INDEX = "source_index"  # with several data sources: which of them a row came from (its index in data.source)
# optional, float32[6]: the goal object's xyz then its target's xyz (world frame, metres) where the frame's scene is
# known, NaN where not; generate-demos writes it, recorded sources have none. Also the batch key (B, 6), the
# target of the policy's locate query (`PolicyConfig.locate_weight`).
OBJECT_POSITIONS = "object_positions"

CANONICAL_COLUMNS = (AGENT_IMAGE, WRIST_IMAGE, STATE, ACTION, INSTRUCTION, EPISODE_INDEX, FRAME_INDEX)
CAMERAS = (AGENT_IMAGE, WRIST_IMAGE)  # the camera order everywhere: agent view first, then wrist

STATE_DIM = 8  # the action's layout (7-D) lives in `atlas_vla.action_layout`
EEF_POSITION = slice(0, 3)  # the state's end-effector xyz (world frame, metres), as `data.transforms.libero_state` lays it out
EEF_ROTATION = slice(3, 6)  # the state's end-effector orientation, axis-angle (radians)

# --- batch keys (after the sample transforms; what AtlasPolicy.forward reads) ---
# uint8 (B, S, 3, H, W); S = num_temporal_frames * num_cameras, current frame first, and within a
# time step the cameras in the order [agentview, wrist]. VGGT treats frame 0 as the reference view.
OBS_IMAGES = "observation.images"
OBS_STATE = STATE  # float32 (B, 8), current frame only
# INSTRUCTION doubles as the batch key: a list of B strings.
# float (B, L, S, T, 2C): the frozen VGGT tokens the fusion reads from each of the policy's `vggt_layers`
# (`AtlasPolicy.vision_features`), precomputed once by a feature store (training.feature_store); a batch
# carries these instead of OBS_IMAGES.
OBS_VISION_FEATURES = "observation.vision_features"
ACTIONS = "actions"  # float32 (B, action_horizon, 7): actions t .. t+action_horizon-1
ACTIONS_PAD_MASK = "actions_is_pad"  # bool (B, action_horizon): True where the chunk runs past the episode end

# --- observation files / simulator observations (layout of the shared .npz fixture) ---
OBSERVATION_KEYS = ("agentview_image", "wrist_image", "state", "task_description")
