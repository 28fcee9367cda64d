"""The toy world: the pretraining world's captioned renders (see world.py and /work/shared/TOYWORLD.md)."""

from calora_ray.toyworld.world import *  # noqa: F401,F403 - the package's interface is world.py's
from calora_ray.toyworld.world import __all__  # noqa: F401 - one list of exported names, in world.py
