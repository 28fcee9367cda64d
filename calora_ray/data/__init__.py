"""Reading labelled data: Cityscapes label conventions (labels.py), the Cityscapes directory
layout (cityscapes.py) and the PNG codec (png.py). Datasets are opened by
calora_ray.datasets.open_dataset; the toy renderers live in calora_ray.toyworld."""
