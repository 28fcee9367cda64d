# A second toy segmenter (jobs/evaluate.py --model-config toy-segformer-b0): mmseg's SegFormer with
# the MiT-B0 encoder, from scratch (no ImageNet weights, nothing downloaded), at 64x64. AdamW, short
# warm-up then poly decay. Same pipelines as toy-fcn-r18-w16.
# $MMSEG_CONFIGS: mmsegmentation's own configs (the .mim/configs of its wheel); calora_ray.evaluation
# sets it while it reads this file (mmengine's 'mmseg::' prefix needs pkg_resources, gone from setuptools>=81).
_base_ = '{{$MMSEG_CONFIGS:}}/segformer/segformer_mit-b0_8xb1-160k_cityscapes-1024x1024.py'

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
    backbone=dict(init_cfg=None),
    decode_head=dict(norm_cfg=norm_cfg, num_classes=19),
    test_cfg=dict(_delete_=True, mode='whole'))

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

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.001, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={'pos_block': dict(decay_mult=0.), 'norm': dict(decay_mult=0.)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=100),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=100, end=2000, by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=2000, val_interval=2000)
default_hooks = dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=2000))
env_cfg = dict(cudnn_benchmark=False)
