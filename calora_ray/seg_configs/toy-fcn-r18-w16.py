# The toy city's segmenter (jobs/evaluate.py --model-config toy-fcn-r18-w16, the default): mmseg's FCN
# on ResNetV1c-18 (output stride 8: dilated stages 3-4) at a quarter of its width (stem and base 16
# channels instead of 64: 0.8M parameters), trained from scratch (no pretrained weights, nothing
# downloaded) at the toy resolution, 64x64. The full-width R18 runs at ~2 images/s on 2 shared CPU
# cores (the dilated 512-channel stage 4 alone is 0.6 GMAC per 64x64 image); this one at ~80 (docs/benchmarks.md). Plain BN
# (one process per run). The job replaces the data sets, keeps this file's model, optimizer, schedule
# and pipelines (LoadImageFromFile / LoadAnnotations become its loaders), and takes the iterations
# from --iters (the schedule is stretched to them).
# $MMSEG_CONFIGS: mmsegmentation's own configs (the .mim/configs of its wheel); calora_ray.evaluation
# sets it while it reads this file (mmengine's 'mmseg::' prefix needs pkg_resources, gone from setuptools>=81).
_base_ = '{{$MMSEG_CONFIGS:}}/fcn/fcn_r18-d8_4xb2-80k_cityscapes-512x1024.py'

crop_size = (64, 64)
norm_cfg = dict(type='BN', requires_grad=True)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,  # the loaders give BGR, as LoadImageFromFile does
    pad_val=0,
    seg_pad_val=255,
    size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(norm_cfg=norm_cfg, stem_channels=16, base_channels=16),
    decode_head=dict(norm_cfg=norm_cfg, in_channels=128, channels=32, num_classes=19),
    auxiliary_head=dict(norm_cfg=norm_cfg, in_channels=64, channels=16, num_classes=19))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(64, 64), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(64, 64), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(batch_size=8, num_workers=1, persistent_workers=True,
                        dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(batch_size=8, num_workers=1, persistent_workers=True,
                      dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optimizer = dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0005)
optim_wrapper = dict(type='OptimWrapper', optimizer=optimizer, clip_grad=None)
param_scheduler = [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=2000, by_epoch=False)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=2000, val_interval=2000)
default_hooks = dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=2000))
env_cfg = dict(cudnn_benchmark=False)
