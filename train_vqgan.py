"""
Train the VQGAN of Taming Transformers (Sec. 3.1): encoder, codebook and decoder against the
pixel loss (+ LPIPS) + the VQ loss of Eq. (4), and, from `disc_start` on, a patch discriminator
with the hinge loss of Eq. (5) weighted by the adaptive lambda of Eq. (7). The steps themselves
are in vqgan_loss.py; this file is the hyperparameters and the loop.

    python train_vqgan.py                         # built-in shapes, ~30 min on a 2-core CPU
    python train_vqgan.py --data=~/photos --image_size=64 --perceptual_weight=1.0
    python train_vqgan.py --preset=paper --data=~/imagenet/train --batch_size=4
    python train_vqgan.py --help                  # every hyperparameter with its default

Writes out_dir/ckpt.pt (model, discriminator, both optimisers, step, config, RNG state),
out_dir/log.csv and out_dir/recon_XXXXXX.png (originals over reconstructions). Next:
python train_gpt.py, which encodes the data with this VQGAN.
"""

import math
import os
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import (BUILT_IN_DATA, NUM_SHAPE_CLASSES, SHAPE_NAMES, TORCHVISION_DATA, condition_input, input_size, make_datasets,
                  step_batches)
from lpips_lite import LPIPS, WeightsUnavailable
from metrics import evaluate, save_usage_histogram
from utils import (append_log, autocast, check_non_negative, config_for_checkpoint, config_to_resume, load_checkpoint,
                   load_optimizer, load_weights, lr_at, parse_overrides, run_script, save_checkpoint, save_image_grid,
                   start_run, stop_if_not_finite, stop_if_weights_not_finite, wrap_for_training)
from vqgan import VQGAN, Discriminator, PAPER_CONFIG, codebook_usage, init_codebook_with_kmeans, restart_dead_codes
from vqgan_loss import adam, discriminator_on, train_step

# -----------------------------------------------------------------------------
# Hyperparameters. Each can be overridden from the shell: --name=value. The defaults train on the
# built-in shapes on a laptop CPU in about half an hour (RESULTS.md has the measured figures).
CONFIG = dict(
    # data
    data="shapes",            # 'shapes' or 'scenes' (built in, no download), a folder of images, or cifar10 / mnist / celeba
    data_root="data",         # where torchvision datasets are downloaded to
    image_size=32,            # training images are resized/cropped to this many pixels square
    val_fraction=0.05,        # share of a folder held out for validation (torchvision sets use their official split)
    num_workers=0,            # DataLoader worker processes; shapes are generated faster in the main process
    # model (the paper: ch 128, ch_mult 1,1,2,2,4, 2 res blocks, attention at 16, z/embed 256, K 1024)
    ch=32,                    # base channel count; level i has ch * ch_mult[i] channels
    ch_mult=(1, 2, 2),        # one entry per resolution level; f = 2^(len-1): 32x32 images -> 8x8 tokens
    num_res_blocks=1,         # ResnetBlocks per level in the encoder (the decoder has one more)
    attn_resolutions=(),      # feature-map sizes that get a self-attention block (besides the middle one, always
                              # there). () for shapes: attention at 8 too made each step slower and gained nothing
    z_channels=64,            # encoder output channels
    embed_dim=8,              # n_z: dimension of each codebook vector (small: codes are used more evenly)
    n_codes=256,              # K: codebook size = the GPT's vocabulary of image tokens
    beta=0.25,                # commitment weight of Eq. (4)
    # codebook health: later fixes for unused codes; all off = the paper's quantizer
    code_dim=0,               # 0 = look codes up in the embed_dim space (paper); D > 0 = 1x1 projections to D dims and back
    l2_codes=False,           # l2-normalise encoder output and codes before the lookup (cosine similarity, ViT-VQGAN)
    kmeans_init=False,        # initialise the codebook with k-means on the first batches' encoder outputs
    dead_code_restart=0,      # N > 0: a code unused for N steps is reset to a random recent encoder output (0 = off)
    # loss
    pixel_loss="l1",          # pixel term of L_rec: 'l1' = |x - x_hat|, the official code's; 'l2' = (x - x_hat)^2,
                              # Eq. (4) as the paper writes it (what PSNR measures: higher PSNR in short runs, no
                              # cleaner shapes). The long default run with clean shapes was measured with l1
    perceptual_weight=0.0,    # LPIPS weight in L_rec. Off for shapes: VGG16 weights are a download, and on
                              # flat synthetic shapes the pixel loss alone gives sharp edges (given the steps). 1.0 for photos.
    lpips_pretrained=True,    # False: random VGG features (works offline, but a much weaker perceptual loss)
    lpips_weights="",         # path to an LPIPS vgg.pth with the learned 1x1 weights ('' = find or use ones)
    disc_start=4500,          # step at which the discriminator starts; before it, D neither trains nor runs
    disc_weight=0.1,          # multiplies the adaptive lambda of Eq. (7). Official configs: 0.8, next to LPIPS;
                              # with the pixel loss alone on shapes, 0.8 lets D trade PSNR for texture
    adaptive_lambda=True,     # False: lambda = disc_weight, fixed, instead of Eq. (7) (an experiment: see README)
    disc_ndf=32,              # discriminator base width (paper 64; 32 is plenty for 32x32 shapes)
    disc_layers=3,            # stride-2 conv blocks in D (paper 3); needs image_size >= 3 * 2^disc_layers
    # optimisation
    batch_size=16,
    max_steps=5000,           # total generator steps. Edges sharpen late: far more clean reconstructed shapes
                              # than at 2200 (RESULTS.md section 10); --max_steps=2200 --disc_start=1900 is the quick look
    lr=2e-3,                  # Adam learning rate for both G and D (paper: 4.5e-6 x batch size, for 256x256)
    warmup_steps=100,         # cosine only: a linear warm-up first; at lr 2e-3 Adam's first, noisy steps can wreck a run
    lr_schedule="cosine",     # 'cosine': decay to lr / 10 by max_steps (better PSNR in the same steps);
                              # 'constant': the official code's fixed lr (the paper preset)
    # logging and checkpoints
    out_dir="out/vqgan",
    eval_interval=500,        # validate, save a reconstruction grid and the checkpoint every this many steps
    eval_images=256,          # validation images per evaluation
    preset="",                # 'paper': the paper's configuration (256x256, f16, K=1024, LPIPS, D from 10k)
    device="auto",            # auto = cuda, then mps, then cpu
    dtype="auto",             # auto = bf16 autocast on CUDA (fp16 + GradScaler without bf16), fp32 elsewhere
    seed=0,
    resume=False,             # continue from out_dir/ckpt.pt exactly where it stopped
    # speed and memory; under torchrun batch_size is per process
    compile=False,            # wrap the models in torch.compile (slow first steps, faster after; needs a C++ compiler)
    grad_checkpointing=False, # recompute encoder/decoder blocks in backward instead of storing their activations
    # spatial conditioning: a condition VQGAN, whose index grid the spatial GPT is conditioned on
    condition="",             # '' = the image VQGAN; 'semantic' = one-hot semantic maps in, per-pixel class logits
                              # out, cross-entropy + VQ loss (no L1/LPIPS/GAN); 'lowres' = images downsampled
                              # by lowres_factor, the usual losses
    lowres_factor=4,          # condition=lowres: the images are downsampled by this factor (the paper's SR used 8)
    cond_data="",             # condition=semantic with --data=PATH: a parallel folder of label PNGs (same names, .png)
    cond_classes=0,           # condition=semantic: number of classes incl. background (0 = the shapes' 4; a folder needs it)
)

# --preset=paper: the paper's VQGAN (custom_vqgan.yaml). lr becomes 4.5e-6 x batch_size unless given.
PAPER_PRESET = dict(PAPER_CONFIG, image_size=256, pixel_loss="l1", perceptual_weight=1.0, disc_start=10000,
                    disc_weight=0.8, lr_schedule="constant", disc_ndf=64, batch_size=4, max_steps=500000,
                    eval_interval=2000, eval_images=64)

# Model keys: these must match a checkpoint we resume from.
MODEL_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "embed_dim", "n_codes", "condition",
              "cond_classes", "lowres_factor",
              "disc_ndf", "disc_layers", "code_dim", "l2_codes")

# -----------------------------------------------------------------------------
# The command line -> a checked config


def resolve_config(overrides):
    """Defaults <- preset <- (checkpoint config when resuming) <- command-line flags."""
    config = dict(CONFIG)
    preset = overrides.get("preset", "")
    if preset not in ("", "paper"):
        raise SystemExit(f"error: --preset={preset} is unknown (the only preset is 'paper')")
    if preset == "paper":
        config.update({k: tuple(v) if isinstance(v, list) else v for k, v in PAPER_PRESET.items() if k in config})
    if overrides.get("resume", False):
        config.update(config_to_resume(overrides, overrides.get("out_dir", config["out_dir"]), "vqgan", MODEL_KEYS))
    config.update(overrides)
    if preset == "paper" and "lr" not in overrides and not overrides.get("resume", False):
        # the paper's lr scaling rule, on the global batch (torchrun: batch_size per process)
        config["lr"] = 4.5e-6 * config["batch_size"] * int(os.environ.get("WORLD_SIZE", 1))
    check_config(config)
    return config


def check_config(c):
    f = 2 ** (len(c["ch_mult"]) - 1)
    positive = ["image_size", "ch", "num_res_blocks", "z_channels", "embed_dim", "batch_size", "max_steps",
                "eval_interval", "eval_images", "disc_ndf", "disc_layers"]
    for k in positive:
        if c[k] <= 0:
            raise SystemExit(f"error: --{k}={c[k]} must be positive")
    if c["n_codes"] < 2:
        raise SystemExit(f"error: --n_codes={c['n_codes']} must be at least 2")
    if not c["ch_mult"] or min(c["ch_mult"]) <= 0 or (c["attn_resolutions"] and min(c["attn_resolutions"]) <= 0):
        raise SystemExit("error: --ch_mult needs at least one level and --attn_resolutions sizes, all positive, "
                         "e.g. --ch_mult=1,2,2 --attn_resolutions=8")
    check_non_negative(c, ("num_workers", "warmup_steps", "disc_start", "cond_classes"))
    if c["lowres_factor"] < 2:
        raise SystemExit(f"error: --lowres_factor={c['lowres_factor']} must be 2 or more")
    check_condition(c)
    size, what = input_size(c), "" if c["condition"] != "lowres" else f" / --lowres_factor={c['lowres_factor']}"
    if size % f:
        raise SystemExit(f"error: --image_size={c['image_size']}{what} = {size} is not a multiple of the downsampling "
                         f"factor f={f} (from --ch_mult); use a multiple of {f}")
    if size < 3 * 2 ** c["disc_layers"]:
        raise SystemExit(f"error: --image_size={c['image_size']}{what} = {size} is too small for a discriminator with "
                         f"--disc_layers={c['disc_layers']} (needs >= {3 * 2 ** c['disc_layers']}; lower --disc_layers)")
    if c["lr"] <= 0 or c["beta"] < 0 or c["perceptual_weight"] < 0 or c["disc_weight"] < 0:
        raise SystemExit("error: --lr must be positive and --beta, --perceptual_weight, --disc_weight non-negative")
    if c["lr_schedule"] not in ("cosine", "constant"):
        raise SystemExit(f"error: --lr_schedule={c['lr_schedule']} is unknown; use cosine or constant")
    if c["lr_schedule"] == "cosine" and not 0 <= c["warmup_steps"] < c["max_steps"]:
        raise SystemExit(f"error: --warmup_steps={c['warmup_steps']} must be at least 0 and below --max_steps="
                         f"{c['max_steps']} (e.g. --warmup_steps=0 for a short run)")
    if c["pixel_loss"] not in ("l2", "l1"):
        raise SystemExit(f"error: --pixel_loss={c['pixel_loss']} is unknown; use l2 or l1")
    if not 0 < c["val_fraction"] < 1:
        raise SystemExit(f"error: --val_fraction={c['val_fraction']} must be between 0 and 1")
    if c["code_dim"] < 0 or c["dead_code_restart"] < 0:
        raise SystemExit("error: --code_dim and --dead_code_restart must be 0 (off) or positive (e.g. --code_dim=8)")


def check_condition(c):
    """The spatial-conditioning flags; fills in cond_classes for the built-in shapes and scenes."""
    if c["condition"] not in ("", "semantic", "lowres"):
        raise SystemExit(f"error: --condition={c['condition']} is not one of semantic, lowres ('' = the image VQGAN)")
    folder = c["data"] not in BUILT_IN_DATA and c["data"] not in TORCHVISION_DATA
    if c["cond_data"] and not (c["condition"] == "semantic" and folder):
        raise SystemExit("error: --cond_data is for --condition=semantic with --data=PATH (a folder of images)")
    if c["condition"] == "semantic":
        if c["data"] in BUILT_IN_DATA:  # both draw the same three shapes: background + 3 classes
            if c["cond_classes"] not in (0, 1 + NUM_SHAPE_CLASSES):
                raise SystemExit(f"error: --cond_classes={c['cond_classes']}: the {c['data']} have {1 + NUM_SHAPE_CLASSES} "
                                 f"classes (background + {', '.join(SHAPE_NAMES)}); leave it at 0")
            c["cond_classes"] = 1 + NUM_SHAPE_CLASSES
        elif not c["cond_data"]:
            raise SystemExit(f"error: --condition=semantic needs semantic maps: --data=shapes or scenes, or --data=PATH with "
                             f"--cond_data=LABELS (--data={c['data']} has none)")
        if c["cond_classes"] < 2:
            raise SystemExit(f"error: --cond_classes={c['cond_classes']}: give the number of classes in the label "
                             f"PNGs, background included (at least 2)")
    if c["condition"] == "lowres" and (c["lowres_factor"] < 2 or c["image_size"] % c["lowres_factor"]):
        raise SystemExit(f"error: --lowres_factor={c['lowres_factor']} must be >= 2 and divide "
                         f"--image_size={c['image_size']}")


def model_kwargs(config):
    # semantic condition: one input channel per class (one-hot), one output logit per class
    channels = config["cond_classes"] if config["condition"] == "semantic" else 3
    return dict(ch=config["ch"], ch_mult=config["ch_mult"], num_res_blocks=config["num_res_blocks"],
                attn_resolutions=config["attn_resolutions"], resolution=input_size(config),
                z_channels=config["z_channels"], embed_dim=config["embed_dim"], n_codes=config["n_codes"],
                beta=config["beta"], in_channels=channels, out_channels=channels,
                code_dim=config["code_dim"], l2_codes=config["l2_codes"])


KMEANS_POINTS_PER_CODE = 10  # --kmeans_init: encoder outputs gathered per code before k-means


@torch.no_grad()
def kmeans_init_codebook(model, train_set, config, device, dtype):
    """--kmeans_init: the codebook from k-means on the encoder outputs of the first training
    batches (the ones step 0, 1, ... will train on), in the lookup space."""
    tokens_per_batch = config["batch_size"] * (input_size(config) // model.downsample_factor) ** 2
    n_batches = -(-KMEANS_POINTS_PER_CODE * model.n_codes // tokens_per_batch)  # ceil
    batches = step_batches(train_set, config["batch_size"], config["seed"], 0, config["num_workers"])
    z_e = []
    for _ in tqdm(range(n_batches), desc="k-means init", leave=False):
        with autocast(device, dtype):
            x = condition_input(next(batches), config).to(device)  # what training feeds the encoder
            z_e.append(model.quant_conv(model.encoder(x)).float())
    init_codebook_with_kmeans(model.quantize, torch.cat(z_e))


def build_lpips(config, device):
    try:
        return LPIPS(pretrained=config["lpips_pretrained"], lin_weights=config["lpips_weights"] or None).to(device)
    except (WeightsUnavailable, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


def loss_settings(config):
    """generator_step's keyword arguments, from the command line: the one place they are read."""
    return dict(semantic=config["condition"] == "semantic", pixel_loss_kind=config["pixel_loss"],
                perceptual_weight=config["perceptual_weight"], adaptive_lambda=config["adaptive_lambda"],
                disc_weight=config["disc_weight"])


def train(config):
    ddp, rank, world_size, device, dtype = start_run(config)
    master = rank == 0  # only this process writes checkpoints, images and logs
    train_set, val_set = make_datasets(config["data"], config["image_size"], config["val_fraction"],
                                       config["seed"], data_root=config["data_root"], cond_data=config["cond_data"],
                                       cond_classes=config["cond_classes"])

    model = VQGAN(**model_kwargs(config)).to(device)
    disc = Discriminator(ndf=config["disc_ndf"], n_layers=config["disc_layers"]).to(device)
    lpips = build_lpips(config, device) if config["perceptual_weight"] > 0 else None
    if config["grad_checkpointing"]:
        model.encoder.grad_checkpointing = model.decoder.grad_checkpointing = True
    if device.type == "cuda":  # channels-last: the layout cuDNN's fastest convolutions want
        model.to(memory_format=torch.channels_last)
        disc.to(memory_format=torch.channels_last)
    if ddp and device.type == "cuda":
        # D's BatchNorm normalises with the statistics of the whole batch, across processes.
        # (PyTorch's SyncBatchNorm runs on GPUs only: on the CPU each process uses its shard's.)
        disc = torch.nn.SyncBatchNorm.convert_sync_batchnorm(disc)
    # Two Adam optimisers with betas (0.5, 0.9) and no weight decay (official); lr follows lr_at.
    opt_g, opt_d = adam(model.parameters(), config["lr"], device), adam(disc.parameters(), config["lr"], device)
    # fp16 needs loss scaling (its small exponent range underflows gradients); bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    out_dir = config["out_dir"]
    ckpt_path, log_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "log.csv")
    step = 0
    if config["resume"]:
        ckpt = load_checkpoint(ckpt_path, "vqgan", resume=True)
        load_weights(model, ckpt["model"], ckpt_path, "model")
        load_weights(disc, ckpt["disc"], ckpt_path, "disc")
        load_optimizer(opt_g, ckpt["opt_g"], ckpt_path, "opt_g")
        load_optimizer(opt_d, ckpt["opt_d"], ckpt_path, "opt_d")
        step = ckpt["step"]
        torch.set_rng_state(ckpt["rng"])
        if master:
            print(f"resuming from {ckpt_path} at step {step}")
    elif config["kmeans_init"]:
        # Under torchrun every rank runs it (seconds, and it keeps the ranks' random streams in step);
        # wrapping the model in DDP below then copies rank 0's codebook to all of them.
        kmeans_init_codebook(model, train_set, config, device, dtype)
    os.makedirs(out_dir, exist_ok=True)
    # steps since each code was last chosen (--dead_code_restart), and code counts since the last
    # evaluation (the usage histogram); code_age is checkpointed so --resume stays exact
    code_age = ckpt["code_age"].to(device) if config["resume"] and "code_age" in ckpt else \
        torch.zeros(model.n_codes, dtype=torch.long, device=device)
    code_counts, restarts = torch.zeros(model.n_codes, dtype=torch.long, device=device), 0
    # what the training step calls (model and disc stay the plain modules, sharing the weights)
    train_model, train_disc = wrap_for_training(model, config, ddp, device), wrap_for_training(disc, config, ddp, device)

    def save():
        save_checkpoint(dict(kind="vqgan", model=model.state_dict(), model_config=model.config,
                             disc=disc.state_dict(), disc_config=disc.config, opt_g=opt_g.state_dict(),
                             opt_d=opt_d.state_dict(), step=step, config=config_for_checkpoint(config),
                             rng=torch.get_rng_state(), code_age=code_age.cpu()), ckpt_path)

    losses = loss_settings(config)
    batches = step_batches(train_set, config["batch_size"], config["seed"], step, config["num_workers"], rank, world_size)
    bar = tqdm(total=config["max_steps"], initial=step, desc="vqgan", dynamic_ncols=True, disable=not master)
    model.train()
    disc.train()
    started = time.time()
    while step < config["max_steps"]:
        x = condition_input(next(batches), config).to(device)
        x = x.to(memory_format=torch.channels_last) if device.type == "cuda" else x
        use_disc = discriminator_on(step, config["disc_start"], semantic=config["condition"] == "semantic")
        lr = lr_at(step, config["lr"], config["max_steps"], config["warmup_steps"], config["lr_schedule"])
        logs, indices = train_step(train_model, train_disc, lpips, opt_g, opt_d, scaler, x, lr, use_disc, losses,
                                   device, dtype)
        step += 1
        stop_if_not_finite(logs, step, ckpt_path, ddp, device)
        code_counts += torch.bincount(indices.flatten(), minlength=model.n_codes)
        if config["dead_code_restart"]:
            restarts += restart_dead_codes(model.quantize, indices, code_age, config["dead_code_restart"], opt_g)
        usage, _ = codebook_usage(indices, model.n_codes)
        bar.update(1)
        bar.set_postfix(rec=f"{logs['rec']:.3f}", q=f"{logs['q']:.3f}", d=f"{logs['d']:.3f}",
                        lam=f"{logs['lam']:.2f}", codes=f"{usage:.0%}")

        evaluating = step % config["eval_interval"] == 0 or step == config["max_steps"]
        if evaluating:  # every process: DDP keeps the weights equal, so all stop together
            stop_if_weights_not_finite((model, disc), step, ckpt_path)  # before sampling or saving over a good ckpt.pt
        if master and evaluating:
            metrics, (x0, x0_hat) = evaluate(model, lpips, val_set, config, device, dtype)
            grid = save_image_grid(torch.cat([x0, x0_hat]), os.path.join(out_dir, f"recon_{step:06d}.png"), len(x0))
            append_log(log_path, dict(step=step, time=round(time.time() - started, 1), **logs, **metrics))
            save()
            lpips_text = "" if math.isnan(metrics.get("val_lpips", math.nan)) else f", LPIPS {metrics['val_lpips']:.4f}"
            quality = (f"pixel accuracy {metrics['val_accuracy']:.2%}" if "val_accuracy" in metrics else
                       f"val L1 {metrics['val_l1']:.4f}, PSNR {metrics['val_psnr']:.2f} dB{lpips_text}")
            clean_text = f", clean shapes {metrics['val_clean']:.0%}" if "val_clean" in metrics else ""
            tqdm.write(f"step {step}: {quality}{clean_text}, codes used {metrics['val_usage']:.1%}, "
                       f"perplexity {metrics['val_perplexity']:.1f}; wrote {grid} and {ckpt_path}")
            if config["dead_code_restart"]:
                tqdm.write(f"dead-code restarts so far: {restarts}")
            if step == config["max_steps"]:
                first = step - (step - 1) % config["eval_interval"]  # first step these counts cover
                histogram = save_usage_histogram(code_counts.cpu(), os.path.join(out_dir, "code_usage.png"),
                                                 f"training steps {first}-{step}" + (", rank 0's batches" if ddp else ""))
                tqdm.write(f"wrote {histogram}")
            code_counts.zero_()
    bar.close()
    if ddp:
        dist.destroy_process_group()
    return model


def main(argv):
    overrides = parse_overrides(CONFIG, argv, __file__)
    config = resolve_config(overrides)
    config = {k: tuple(v) if isinstance(CONFIG[k], tuple) else v for k, v in config.items()}
    train(config)


if __name__ == "__main__":
    run_script(main)