"""
Train the transformer of Taming Transformers (Sec. 3.2): a GPT that learns p(s) (Eq. 8) or
p(s | c) (Eq. 10) over the VQGAN's grids of codebook indices, with the cross-entropy of Eq. (9).

    python train_gpt.py                                   # after train_vqgan.py, on its data
    python train_gpt.py --conditional=class               # one start token per class: p(s | c)
    python train_gpt.py --help                            # every hyperparameter with its default

The frozen VQGAN encodes the dataset to index grids once; the grids are cached on disk next to
the checkpoint (out_dir/tokens_<key>.pt, keyed by the VQGAN checkpoint and the data settings),
so training the GPT never runs the encoder again. Writes out_dir/ckpt.pt (latest, for --resume),
out_dir/best.pt (lowest validation loss), out_dir/log.csv and out_dir/samples_XXXXXX.png.
"""

import hashlib
import math
import os
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from gpt import GPT, cond_tokens, corrupt_tokens, gpt_loss, spatial_cond_tokens
from data import SHAPE_NAMES, condition_input, make_datasets, show_condition
from utils import (append_log, autocast, check_non_negative, config_to_resume, file_digest, load_checkpoint,
                   load_optimizer, load_weights, lr_at, parse_overrides, run_script, save_checkpoint, save_image_grid,
                   start_run, stop_if_not_finite, stop_if_weights_not_finite, unwrap, weights_digest, wrap_for_training)
from vqgan import vqgan_from_checkpoint

# -----------------------------------------------------------------------------
# Hyperparameters, each overridable as --name=value. The defaults train on the built-in shapes
# (8x8 tokens from the default VQGAN) in about 20 minutes on a 2-core CPU (RESULTS.md).
CONFIG = dict(
    vqgan_ckpt="out/vqgan/ckpt.pt",  # the frozen first stage whose index grids the GPT learns
    data="",                  # '' = the data the VQGAN was trained on; else shapes, a folder, cifar10, ...
    max_images=50000,         # encode at most this many training images into the token cache (0 = all). 50000 =
                              # all the built-in shapes: with fewer, the GPT overfits them (RESULTS.md section 10)
    conditional="none",       # 'none': p(s), one start token; 'class': p(s | c), one token per class (Eq. 10)
    # model (the paper's faces/depth GPT: 24 layers, 16 heads, 1024 wide, block 512)
    n_layer=4,                # transformer blocks
    n_head=4,                 # attention heads per block
    n_embd=128,               # width of the residual stream
    # optimisation
    batch_size=64,            # sequences per step
    max_steps=3000,           # optimiser steps
    lr=2e-3,                  # peak learning rate (small model, short run; the paper's big GPTs use 4.5e-6 x batch)
    warmup_steps=100,         # linear warm-up, then cosine decay to lr / 10
    weight_decay=0.01,        # AdamW decay, on Linear weight matrices only (official)
    grad_clip=1.0,            # clip the global gradient norm (0 = off): keeps a rare bad batch from derailing it
    pkeep=1.0,                # official option: keep each input token with this probability, else a random code
    # logging and checkpoints
    out_dir="out/gpt",
    eval_interval=500,        # validation loss, sample grid and checkpoint every this many steps
    eval_batches=8,           # validation batches per evaluation
    num_samples=24,           # images in each sample grid (class-conditional: spread over one row per class)
    device="auto",            # auto = cuda, then mps, then cpu
    dtype="auto",             # auto = bf16 autocast on CUDA (fp16 + GradScaler without bf16), fp32 elsewhere
    seed=0,
    resume=False,             # continue from out_dir/ckpt.pt exactly where it stopped
    # speed and memory; under torchrun batch_size is per process
    compile=False,            # wrap the model in torch.compile (slow first steps, faster after; needs a C++ compiler)
    grad_checkpointing=False, # recompute each transformer block in backward instead of storing its activations
    # spatial conditioning: --conditional=spatial learns p(s | r), r = a condition VQGAN's index grid
    cond_vqgan_ckpt="",       # conditional=spatial: the condition VQGAN (train_vqgan.py --condition=semantic|lowres)
)

MODEL_KEYS = ("n_layer", "n_head", "n_embd", "conditional", "vqgan_ckpt", "data", "cond_vqgan_ckpt")



def learning_rate(step, config):
    # warm-up, then cosine decay to lr / 10 (utils.lr_at, shared with the VQGAN)
    return lr_at(step, config["lr"], config["max_steps"], config["warmup_steps"], "cosine")


# -----------------------------------------------------------------------------
# The token cache: the dataset as index grids, computed once with the frozen VQGAN


def cache_key(vqgan_path, data_settings):
    # The key changes when the VQGAN file changes (any byte) or when any data setting does, so a
    # stale cache is never reused; an unchanged pair always hits the same file.
    text = file_digest(vqgan_path) + repr(sorted(data_settings.items()))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


@torch.no_grad()
def encode_dataset(vqgan, dataset, max_images, batch_size, device, desc, cond_vqgan=None, cond_config=None):
    """-> (tokens (N, h, w) long, labels (N,) long). With random flips, both orientations.
    With a condition VQGAN (spatial conditioning; cond_config = its training config), also the
    condition's index grids (N, hc, wc), encoded from the same items in the same pass, so a
    random crop or flip is the same for an image and its condition."""
    n = len(dataset) if max_images <= 0 else min(len(dataset), max_images)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size)
    tokens, labels, conds = [], [], []
    for batch in tqdm(loader, desc=desc, leave=False):
        x, y = batch[0].to(device), torch.as_tensor(batch[1])
        c = condition_input(batch, cond_config).to(device) if cond_vqgan is not None else None
        for flip in ([False, True] if getattr(dataset, "random_flip", False) else [False]):
            tokens.append(vqgan.encode(x.flip(-1) if flip else x)[1].cpu())
            labels.append(y)
            if c is not None:
                conds.append(cond_vqgan.encode(c.flip(-1) if flip else c)[1].cpu())
    if cond_vqgan is None:
        return torch.cat(tokens), torch.cat(labels)
    return torch.cat(tokens), torch.cat(labels), torch.cat(conds)


def load_token_cache(config, vqgan, data_config, device, cond_vqgan=None, cond_config=None):
    """The cached index grids for (VQGAN checkpoint, data settings), encoding them on a miss.
    With a condition VQGAN, the condition's grids too (train_cond, val_cond)."""
    settings = dict(data=data_config["data"], image_size=data_config["image_size"], seed=data_config["seed"],
                    val_fraction=data_config["val_fraction"], max_images=config["max_images"])
    if cond_vqgan is not None:  # a different condition VQGAN (any byte) or label folder is another cache
        settings.update(cond_vqgan=file_digest(config["cond_vqgan_ckpt"]), cond_data=cond_config["cond_data"])
    path = os.path.join(config["out_dir"], f"tokens_{cache_key(config['vqgan_ckpt'], settings)}.pt")
    if os.path.exists(path):
        print(f"token cache: reusing {path}")
        return torch.load(path, map_location="cpu", weights_only=True)
    cond_data = dict(cond_data=cond_config["cond_data"], cond_classes=cond_config["cond_classes"]) if cond_config else {}
    train_set, val_set = make_datasets(settings["data"], settings["image_size"], settings["val_fraction"],
                                       settings["seed"], data_root=data_config["data_root"], **cond_data)
    cond = dict(cond_vqgan=cond_vqgan, cond_config=cond_config)
    train = encode_dataset(vqgan, train_set, config["max_images"], 256, device, "encode train", **cond)
    val = encode_dataset(vqgan, val_set, 0, 256, device, "encode val", **cond)
    train_tokens, train_labels, val_tokens, val_labels = train[0], train[1], val[0], val[1]
    cache = dict(train_tokens=train_tokens, train_labels=train_labels, val_tokens=val_tokens,
                 val_labels=val_labels, num_classes=getattr(train_set, "num_classes", 0), settings=settings)
    if cond_vqgan is not None:
        cache.update(train_cond=train[2], val_cond=val[2])
    save_checkpoint(cache, path)
    print(f"token cache: wrote {len(train_tokens)} + {len(val_tokens)} grids of {tuple(train_tokens.shape[1:])} to {path}")
    return cache


# -----------------------------------------------------------------------------
# Training


def make_sequences(model, tokens, labels, conditional):
    """[c, s]: one conditioning token, then the h*w image tokens in raster order (Eq. 8 / 10).
    conditional='spatial': labels are the condition's index grids r, and the sequence is [r, s]."""
    if conditional == "spatial":
        return torch.cat([spatial_cond_tokens(model, labels).flatten(1), tokens.flatten(1)], dim=1)
    cond = cond_tokens(model, labels if conditional == "class" else None, tokens.size(0), tokens.device)
    return torch.cat([cond, tokens.flatten(1)], dim=1)


def batch_at(tokens, labels, step, batch_size, seed):
    # Random rows chosen by (seed, step) alone: --resume replays exactly the same batches.
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    rows = torch.randint(0, tokens.size(0), (batch_size,), generator=g)
    return tokens[rows], labels[rows], g


def train_step(model, optimizer, scaler, tokens, labels, step, config, device, dtype, rank=0, world_size=1):
    # Under torchrun every process draws the same global batch of batch_size x world_size rows
    # (and its pkeep noise) and keeps its own slice: together, the single-process batch.
    B, n_codes = config["batch_size"], unwrap(model).n_codes
    tokens, labels, g = batch_at(tokens, labels, step, B * world_size, config["seed"])
    tokens, labels = tokens.to(device), labels.to(device)
    seq = make_sequences(unwrap(model), tokens, labels, config["conditional"])
    n_cond = seq.size(1) - tokens[0].numel()  # 1, or the whole condition grid r
    inputs = seq
    if config["pkeep"] < 1.0:  # corrupt the inputs only; the targets in seq stay true
        noisy = corrupt_tokens(tokens.flatten(1), config["pkeep"], n_codes, generator=g)
        inputs = torch.cat([seq[:, :n_cond], noisy.to(device)], dim=1)
    seq, inputs = seq[rank * B:(rank + 1) * B], inputs[rank * B:(rank + 1) * B]
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, config)
    with autocast(device, dtype):
        loss = gpt_loss(model(inputs[:, :-1]), seq, n_cond=n_cond)  # Eq. (9)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if config["grad_clip"] > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
    scaler.step(optimizer)
    scaler.update()
    return loss.item()


@torch.no_grad()
def validation_loss(model, tokens, labels, config, device, dtype):
    """Mean cross-entropy per image token over the first eval_batches batches, in nats."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, min(len(tokens), config["eval_batches"] * config["batch_size"]), config["batch_size"]):
        t, y = tokens[i:i + config["batch_size"]].to(device), labels[i:i + config["batch_size"]].to(device)
        seq = make_sequences(model, t, y, config["conditional"])
        with autocast(device, dtype):
            total += gpt_loss(model(seq[:, :-1]), seq, n_cond=seq.size(1) - t[0].numel()).item() * len(t)
        count += len(t)
    model.train()
    return total / count


@torch.no_grad()
def sample_grid(model, vqgan, grid_hw, config, num_classes, device, path, seed):
    """Decode fresh samples into a PNG; class-conditional: one row per class."""
    model.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    if config["conditional"] == "class":
        per_row = max(1, config["num_samples"] // num_classes)
        labels = torch.arange(num_classes, device=device).repeat_interleave(per_row)
        cond, nrow = cond_tokens(model, labels, len(labels), device), per_row
    else:
        cond, nrow = cond_tokens(model, None, config["num_samples"], device), 8
    tokens = model.generate(cond, grid_hw[0] * grid_hw[1], generator=g)
    images = vqgan.decode_indices(tokens.view(-1, *grid_hw))
    model.train()
    return save_image_grid(images, path, nrow)


@torch.no_grad()
def spatial_sample_grid(model, vqgan, cond_vqgan, cond_config, cond_grids, grid_hw, path, seed):
    """Samples for given condition grids: pairs [condition (its VQGAN's reconstruction), sample]."""
    model.eval()
    g = torch.Generator(device=cond_grids.device).manual_seed(seed)
    tokens = model.generate(spatial_cond_tokens(model, cond_grids).flatten(1), grid_hw[0] * grid_hw[1], generator=g)
    images = vqgan.decode_indices(tokens.view(-1, *grid_hw))
    conditions = show_condition(cond_vqgan.decode_indices(cond_grids), cond_config)
    model.train()
    return save_image_grid(torch.stack([conditions, images], 1).flatten(0, 1), path, nrow=8)


def load_cond_vqgan(path, image_vqgan_config, device):
    """The frozen condition VQGAN of a spatial GPT and its training config, checked against the
    image VQGAN's data (the pairs must come from the same items)."""
    ckpt = load_checkpoint(path, "vqgan")
    cond_config = ckpt["config"]
    if cond_config.get("condition", "") not in ("semantic", "lowres"):
        raise SystemExit(f"error: --cond_vqgan_ckpt={path} is an image VQGAN, not a condition VQGAN "
                         f"(train one with train_vqgan.py --condition=semantic or --condition=lowres)")
    for key in ("data", "image_size", "seed", "val_fraction"):
        if cond_config[key] != image_vqgan_config[key]:
            raise SystemExit(f"error: the condition VQGAN was trained with {key}={cond_config[key]} but the image "
                             f"VQGAN with {key}={image_vqgan_config[key]} (train both on the same data)")
    return vqgan_from_checkpoint(ckpt, path).to(device).eval().requires_grad_(False), cond_config


def resolve_config(overrides):
    config = dict(CONFIG)
    if overrides.get("resume", False):
        config.update(config_to_resume(overrides, overrides.get("out_dir", config["out_dir"]), "gpt", MODEL_KEYS))
    config.update(overrides)
    if config["conditional"] not in ("none", "class", "spatial"):
        raise SystemExit(f"error: --conditional={config['conditional']} is not one of none, class, spatial")
    if (config["conditional"] == "spatial") != bool(config["cond_vqgan_ckpt"]):
        raise SystemExit("error: --conditional=spatial and --cond_vqgan_ckpt=CKPT go together (the condition VQGAN "
                         "from train_vqgan.py --condition=semantic|lowres)")
    for k in ("n_layer", "n_head", "n_embd", "batch_size", "max_steps", "eval_interval", "eval_batches", "num_samples"):
        if config[k] <= 0:
            raise SystemExit(f"error: --{k}={config[k]} must be positive")
    if config["n_embd"] % config["n_head"]:
        raise SystemExit(f"error: --n_embd={config['n_embd']} is not divisible by --n_head={config['n_head']}")
    if not 0 < config["pkeep"] <= 1 or config["lr"] <= 0 or config["warmup_steps"] < 0:
        raise SystemExit("error: --pkeep must be in (0, 1], --lr positive and --warmup_steps non-negative")
    check_non_negative(config, ("max_images", "weight_decay", "grad_clip"))
    return config


def train(config):
    ddp, rank, world_size, device, dtype = start_run(config)
    master = rank == 0  # only this process writes checkpoints, images and logs
    vq_ckpt = load_checkpoint(config["vqgan_ckpt"], "vqgan")
    vqgan = vqgan_from_checkpoint(vq_ckpt, config["vqgan_ckpt"]).to(device).eval().requires_grad_(False)
    # sample.py refuses any other VQGAN for this GPT: its codes would mean other pictures
    vqgan_digest = weights_digest(vq_ckpt["model"])
    data_config = dict(vq_ckpt["config"], **({"data": config["data"]} if config["data"] else {}))
    spatial = config["conditional"] == "spatial"
    cond_vqgan, cond_config = load_cond_vqgan(config["cond_vqgan_ckpt"], data_config, device) if spatial else (None, None)
    if ddp and not master:
        dist.barrier()  # let rank 0 encode and write the token cache first, then read it
    try:
        cache = load_token_cache(config, vqgan, data_config, device, cond_vqgan, cond_config)
    finally:  # also when rank 0 stops with an error: the others must not wait for it forever
        if ddp and master:
            dist.barrier()
    train_tokens, train_labels = cache["train_tokens"], cache["train_labels"]
    val_tokens, val_labels = cache["val_tokens"], cache["val_labels"]
    if spatial:  # from here on a spatial model's "labels" are its condition grids r, one per image
        train_labels, val_labels = cache["train_cond"], cache["val_cond"]
    grid_hw = tuple(train_tokens.shape[1:])
    n_cond = train_labels[0].numel() if spatial else 1
    num_classes = cache["num_classes"]
    if config["conditional"] == "class" and num_classes == 0:
        raise SystemExit(f"error: --conditional=class needs labelled data, and {data_config['data']} has no "
                         f"class labels (use --conditional=none)")

    model = GPT(n_codes=vqgan.n_codes, block_size=n_cond + grid_hw[0] * grid_hw[1], n_layer=config["n_layer"],
                n_head=config["n_head"], n_embd=config["n_embd"],
                n_cond_tokens=num_classes if config["conditional"] == "class" else
                cond_vqgan.n_codes if spatial else 1).to(device)
    model.grad_checkpointing = config["grad_checkpointing"]
    optimizer = model.configure_optimizer(config["lr"], config["weight_decay"], betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    out_dir = config["out_dir"]
    ckpt_path, best_path, log_path = (os.path.join(out_dir, n) for n in ("ckpt.pt", "best.pt", "log.csv"))
    step, best = 0, float("inf")
    if config["resume"]:
        ckpt = load_checkpoint(ckpt_path, "gpt", resume=True)
        load_weights(model, ckpt["model"], ckpt_path, "model")
        load_optimizer(optimizer, ckpt["optimizer"], ckpt_path, "optimizer")
        step, best = ckpt["step"], ckpt["best_val_loss"]
        torch.set_rng_state(ckpt["rng"])
        if master:
            print(f"resuming from {ckpt_path} at step {step}")
    train_model = wrap_for_training(model, config, ddp, device)  # shares its weights with `model`
    class_names = list(SHAPE_NAMES) if data_config["data"] == "shapes" else [str(i) for i in range(num_classes)]
    if master:
        print(f"GPT: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(train_tokens)} training "
              f"grids of {grid_hw[0]}x{grid_hw[1]} tokens, vocabulary {vqgan.n_codes} codes")

    def checkpoint(val_loss):
        return dict(kind="gpt", model=model.state_dict(), model_config=model.config, optimizer=optimizer.state_dict(),
                    step=step, best_val_loss=best, val_loss=val_loss, config=config, rng=torch.get_rng_state(),
                    vqgan_ckpt=config["vqgan_ckpt"], vqgan_config=vqgan.config, vqgan_digest=vqgan_digest,
                    grid_hw=list(grid_hw),
                    image_size=data_config["image_size"], conditional=config["conditional"],
                    class_names=class_names if config["conditional"] == "class" else [],
                    **(dict(cond_vqgan_ckpt=config["cond_vqgan_ckpt"], cond_config=cond_config,
                            cond_vqgan_digest=weights_digest(cond_vqgan.state_dict()),
                            cond_grid_hw=list(train_labels.shape[1:])) if spatial else {}))

    bar = tqdm(total=config["max_steps"], initial=step, desc="gpt", dynamic_ncols=True, disable=not master)
    started = time.time()
    while step < config["max_steps"]:
        loss = train_step(train_model, optimizer, scaler, train_tokens, train_labels, step, config, device, dtype,
                          rank, world_size)
        step += 1
        stop_if_not_finite(dict(loss=loss), step, ckpt_path, ddp, device)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{learning_rate(step - 1, config):.1e}")
        evaluating = step % config["eval_interval"] == 0 or step == config["max_steps"]
        if evaluating:  # every process: DDP keeps the weights equal, so all stop together
            stop_if_weights_not_finite((model,), step, ckpt_path)  # before sampling or saving over a good ckpt.pt
        if master and evaluating:
            val = validation_loss(model, val_tokens, val_labels, config, device, dtype)
            png_path = os.path.join(out_dir, f"samples_{step:06d}.png")
            if spatial:  # the first validation conditions, each beside its sample
                png = spatial_sample_grid(model, vqgan, cond_vqgan, cond_config, val_labels[:config["num_samples"]].to(device),
                                          grid_hw, png_path, config["seed"])
            else:
                png = sample_grid(model, vqgan, grid_hw, config, num_classes, device, png_path, config["seed"])
            improved = val < best
            best = min(best, val)
            save_checkpoint(checkpoint(val), ckpt_path)
            if improved:
                save_checkpoint(checkpoint(val), best_path)
            append_log(log_path, dict(step=step, time=round(time.time() - started, 1), train_loss=loss,
                                      val_loss=val, val_bits_per_token=val / math.log(2), lr=learning_rate(step - 1, config)))
            tqdm.write(f"step {step}: val loss {val:.4f} nats/token ({val / math.log(2):.3f} bits/token)"
                       f"{' (best)' if improved else ''}; wrote {png} and {ckpt_path}")
    bar.close()
    if ddp:
        dist.destroy_process_group()
    return model


def main(argv):
    train(resolve_config(parse_overrides(CONFIG, argv, __file__)))


if __name__ == "__main__":
    run_script(main)
