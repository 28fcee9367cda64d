"""calora_ray: Concept-Aware LoRA (CA-LoRA) for domain-aligned segmentation dataset generation.

The math (losses, sensitivity, selection, LoRA targeting) is plain torch in `losses`,
`sensitivity`, `selection`, `lora`; jobs are in `scoring` and `training`; Ray adapters sit beside
them. See README.md for the map.
"""

__version__ = "0.1.0"
