"""Pretraining of the toy world's model: ``jax-inversion toyworld pretrain --workdir DIR``.

The shipped files were made in seven runs (their logs are beside the files in
``jax_inversion/toyworld/pretrained/``): three on a 2-core CPU, then a model round and the
detector side by side on one H100 GPU in 7.5 minutes, then two model rounds on the world with
unnamed looks on the 2-core CPU. The model's first two runs
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

W4's snapshot ``snapshots/step_6000`` was the newest whole one when the lease's time ran out
(step 7,500 of the 20,000 planned). The shipped model continues it twice on the world with
unnamed stars and checkers (``world.unnamed_scenes``; the tokenizer gains the word "shape",
its row starting at the mean of the shape words'), on the 2-core CPU, 25.3 + 22.7 min
(model_continue4_unnamed_log.jsonl, model_continue5_unnamed_log.jsonl)::

    jax-inversion toyworld pretrain --workdir W6 --config.stages=model --config.init_from=W4/snapshots/step_6000 \
        --config.world=unnamed --config.diffusion.steps=3000 --config.diffusion.warmup_steps=100 \
        --config.diffusion.save_every=500
    jax-inversion toyworld pretrain --workdir W7 --config.stages=model --config.init_from=W6/model \
        --config.world=unnamed --config.seed=1 --config.diffusion.steps=3000 --config.diffusion.warmup_steps=100 \
        --config.diffusion.save_every=500

The shipped model is W7's ``model``. Each continuation trains the text encoder + UNet further from a fresh learning-rate schedule,
the VAE kept byte for byte. Override any field with ``--config.<key>=value``.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.stages = "model,detector"  # "model": VAE, then text encoder + UNet; "detector": the evaluation's detector
    config.init_from = ""  # a model this command wrote: keep its VAE, train its text encoder + UNet further
    config.num_scenes = 12000  # rendered once; VAE latents are encoded once and cached
    config.world = "seen"  # "seen": SEEN only; "unnamed": stars and checkered shown but never named (world.unnamed_scenes)
    config.unnamed_rate = 0.05  # unnamed world: per object, the chance of a star, and of a checkered texture
    config.generic_rate = 0.05  # unnamed world: per other object, the chance its caption says "shape"

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
    config.detector.num_scenes = 12000  # scenes of the whole world, stars, checkered and melting included
    config.detector.eval_scenes = 1000  # fresh scenes its accuracy is logged on
    config.detector.vae_from = ""  # a model dir: half of each batch is the scenes through its VAE (what generated images are)

    config.log_every = 100
    return config
