"""Pretraining of the toy world's model: ``jax-inversion toyworld pretrain --workdir DIR``.

The shipped files were made in five runs (their logs are beside the files in
``jax_inversion/toyworld/pretrained/``): three on a 2-core CPU, then the model's last round
and the detector side by side on one H100 GPU in 7.5 minutes. The model's first two runs
predate Min-SNR weighting, so reproducing those exactly needs ``--config.diffusion.min_snr_gamma=0``::

    jax-inversion toyworld pretrain --workdir W --config.stages=model --config.diffusion.min_snr_gamma=0
    jax-inversion toyworld pretrain --workdir W2 --config.stages=model --config.init_from=W/model \
        --config.diffusion.steps=1000 --config.diffusion.warmup_steps=50 --config.diffusion.min_snr_gamma=0
    jax-inversion toyworld pretrain --workdir W3 --config.stages=model --config.init_from=W2/model \
        --config.diffusion.steps=4000 --config.diffusion.warmup_steps=50 --config.diffusion.save_every=500
    # on the GPU, side by side (model_continue3_gpu_log.jsonl, detector_pretrain_log.jsonl):
    jax-inversion toyworld pretrain --workdir W4 --config.stages=model --config.init_from=W3/model \
        --config.num_scenes=48000 --config.diffusion.steps=20000 --config.diffusion.batch_size=128 \
        --config.diffusion.warmup_steps=200 --config.diffusion.save_every=2000
    jax-inversion toyworld pretrain --workdir W5 --config.stages=detector --config.detector.steps=10000 \
        --config.detector.batch_size=128 --config.detector.num_scenes=40000 --config.detector.vae_from=W3/model

The shipped model is W4's snapshot ``snapshots/step_6000``: the lease's time ran out at step
7,500 of the 20,000 planned, and that snapshot (EMA weights) was the newest whole one. Each
continuation trains the text encoder + UNet further from a fresh learning-rate schedule,
the VAE kept byte for byte. Override any field with ``--config.<key>=value``.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.stages = "model,detector"  # "model": VAE, then text encoder + UNet; "detector": the evaluation's detector
    config.init_from = ""  # a model this command wrote: keep its VAE, train its text encoder + UNet further
    config.num_scenes = 12000  # rendered once; VAE latents are encoded once and cached

    config.vae = ml_collections.ConfigDict()
    config.vae.steps = 1500
    config.vae.crop = 32  # random crops of the 64x64 scenes: 4x cheaper steps
    config.vae.batch_size = 16
    config.vae.learning_rate = 1.5e-3
    config.vae.kl_weight = 1e-6

    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.steps = 1200  # text encoder + UNet, end to end
    config.diffusion.batch_size = 32
    config.diffusion.learning_rate = 1e-3
    config.diffusion.warmup_steps = 100
    config.diffusion.caption_dropout = 0.1  # empty prompt instead, so classifier-free guidance works
    config.diffusion.ema_decay = 0.999
    config.diffusion.min_snr_gamma = 5.0  # Min-SNR-gamma loss weights (Hang et al. 2023); 0 turns them off
    config.diffusion.save_every = 0  # also write a whole model to snapshots/step_N every N steps (0: only the final one)

    config.detector = ml_collections.ConfigDict()
    config.detector.steps = 1200
    config.detector.batch_size = 64
    config.detector.learning_rate = 1e-3
    config.detector.num_scenes = 12000  # scenes of the whole world, held-out concepts included
    config.detector.eval_scenes = 1000  # fresh scenes its accuracy is logged on
    config.detector.vae_from = ""  # a model dir: half of each batch is the scenes through its VAE (what generated images are)

    config.log_every = 100
    return config
