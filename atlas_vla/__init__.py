"""atlas-vla: train Atlas, a frozen-VGGT vision-language-action policy, on LIBERO with Accelerate."""

__version__ = "0.1.0"
