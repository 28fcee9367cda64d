# Real size, for GPUs (jobs/evaluate.py --model-config cityscapes-deeplabv3plus-r101): mmseg's
# DeepLabV3+ on ResNetV1c-101 Cityscapes recipe as shipped (ImageNet-pretrained backbone, downloaded
# on first use; SGD, poly; 512x1024 crops, 2 images per batch per GPU; SyncBN, which mmengine turns
# into BN in a one-GPU run). 80k iterations unless --iters says otherwise (the schedule is stretched).
# $MMSEG_CONFIGS: mmsegmentation's own configs (the .mim/configs of its wheel); calora_ray.evaluation
# sets it while it reads this file (mmengine's 'mmseg::' prefix needs pkg_resources, gone from setuptools>=81).
_base_ = '{{$MMSEG_CONFIGS:}}/deeplabv3plus/deeplabv3plus_r101-d8_4xb2-80k_cityscapes-512x1024.py'
