# Real size, for GPUs (jobs/evaluate.py --model-config cityscapes-segformer-b5): mmseg's SegFormer
# MiT-B5 Cityscapes recipe (ImageNet-pretrained encoder, downloaded from download.openmmlab.com on
# first use; AdamW, warm-up + poly) with 512x1024 training crops and 2 images per batch per GPU
# (1 real + 1 synthetic at the default 1:1 mix). 40k iterations unless --iters says otherwise; the
# schedule is stretched to --iters. Evaluation: sliding 1024x1024 windows on the 1024x2048 images.
# $MMSEG_CONFIGS: mmsegmentation's own configs (the .mim/configs of its wheel); calora_ray.evaluation
# sets it while it reads this file (mmengine's 'mmseg::' prefix needs pkg_resources, gone from setuptools>=81).
_base_ = '{{$MMSEG_CONFIGS:}}/segformer/segformer_mit-b5_8xb1-160k_cityscapes-1024x1024.py'

crop_size = (512, 1024)
data_preprocessor = dict(size=crop_size)
model = dict(data_preprocessor=data_preprocessor)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(2048, 1024), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(batch_size=2, num_workers=4, dataset=dict(pipeline=train_pipeline))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=40000, by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=40000, val_interval=4000)
