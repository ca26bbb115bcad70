"""
The plumbing the scripts share, none of it from the paper: --name=value flags and --help, the
device and the autocast dtype, torchrun/DDP, atomic checkpoints and safe loading (also of the
official Lightning files), image grids, the learning-rate schedule and the CSV log.
"""

import csv
import hashlib
import math
import os
import pickle
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torchvision

# -----------------------------------------------------------------------------
# flags: every script's hyperparameters sit in its CONFIG dict; --name=value overrides one


def parse_overrides(defaults, argv, source_file):
    """--name=value flags -> {name: value} with the type of the default. Errors are one line."""
    out = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print_help(source_file)
            sys.exit(0)
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"error: cannot read {arg!r}: flags look like --name=value (see --help)")
        name, value = arg[2:].split("=", 1)
        if name not in defaults:
            raise SystemExit(f"error: unknown flag --{name} (see --help for the list)")
        out[name] = convert_value(name, value, defaults[name])
    return out


def convert_value(name, value, default):
    try:
        if isinstance(default, bool):  # before int: bool is a subclass of int
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if isinstance(default, tuple):
            return tuple(int(v) for v in value.split(",") if v.strip())
        out = type(default)(value)
        if isinstance(out, float) and not math.isfinite(out):  # float() reads nan and inf; no setting wants them
            raise SystemExit(f"error: --{name}={value} is not a finite number (default: {format_value(default)})")
        return out
    except ValueError:
        kind = "true or false" if isinstance(default, bool) else \
            "comma-separated integers like 1,2,2" if isinstance(default, tuple) else f"a {type(default).__name__}"
        raise SystemExit(f"error: --{name}={value} is not {kind} (default: {format_value(default)})") from None


def run_script(main):
    """A script's entry point: main(sys.argv[1:]), where an 'error: ...' SystemExit is that one
    line on stderr and exit code 2 (the shell's code for bad usage, as argparse gives), never a
    traceback; --help and normal ends exit 0."""
    try:
        main(sys.argv[1:])
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            sys.exit(2)
        raise


def check_non_negative(config, names):
    """One line for the first of these numeric flags that is below 0."""
    for k in names:
        if config[k] < 0:
            raise SystemExit(f"error: --{k}={config[k]} must be 0 or more")


def format_value(v):
    return ",".join(str(x) for x in v) if isinstance(v, tuple) else str(v)


def print_help(source_file):
    # The hyperparameters are documented once, where they are defined: print that block.
    lines = open(source_file).read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("CONFIG = dict("))
    end = next(i for i in range(start, len(lines)) if lines[i] == ")")
    print(f"usage: python {os.path.basename(source_file)} [--name=value ...]\n")
    print("\n".join(lines[start + 1:end]))


# -----------------------------------------------------------------------------
# device, precision, torchrun


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device={name} but CUDA is not available here (use --device=auto or cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("error: --device=mps but MPS is not available here (use --device=auto or cpu)")
    if name != "cpu" and not name.startswith("cuda") and name != "mps":
        raise SystemExit(f"error: --device={name} is not one of auto, cpu, cuda, cuda:N, mps")
    return torch.device(name)


def pick_dtype(name, device):
    """The autocast dtype, or None for plain fp32."""
    if name == "auto":
        if device.type != "cuda":
            return None  # CPU: fp32 is fastest and exact; MPS: keep the simple, known-good path
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    choices = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in choices:
        raise SystemExit(f"error: --dtype={name} is not one of auto, float32, bfloat16, float16")
    if choices[name] is not None and device.type != "cuda":
        raise SystemExit(f"error: --dtype={name} needs a CUDA device (use --dtype=auto on {device.type})")
    return choices[name]


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def setup_ddp(device_name):
    """-> (ddp, rank, world_size, device). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE in each
    process it starts; without them this is a plain single-process run and nothing changes."""
    if "RANK" not in os.environ:
        return False, 0, 1, pick_device(device_name)
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = pick_device(device_name)
    if device.type == "mps":
        raise SystemExit("error: torchrun needs CUDA (nccl) or the CPU (gloo), not MPS (use --device=cpu)")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True, rank, world_size, device


def wrap_for_training(module, config, ddp, device):
    """The module the training step calls: torch.compile'd and/or DDP-wrapped as asked. It shares
    its parameters with `module`, which stays the one to save, evaluate and sample with (plain
    state-dict keys, no collective operations)."""
    if config["compile"]:
        # Eq. (7) takes gradients of the same graph twice (retain_graph=True), which compiled
        # backward functions refuse while they reuse ("donate") their buffers: keep them their own.
        torch._functorch.config.donated_buffer = False
        module = torch.compile(module)
    if ddp:
        # DDP averages the gradients over the processes during backward
        module = torch.nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    return module


def unwrap_ddp(module):
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def unwrap(module):
    """The plain module inside DDP and torch.compile wrappers."""
    return getattr(unwrap_ddp(module), "_orig_mod", unwrap_ddp(module))  # torch.compile keeps it as _orig_mod


def start_run(config):
    """What both training scripts start with: this process's place in a torchrun job (or a single
    process), its device and dtype, and the seed."""
    ddp, rank, world_size, device = setup_ddp(config["device"])
    torch.manual_seed(config["seed"])
    return ddp, rank, world_size, device, pick_dtype(config["dtype"], device)


# -----------------------------------------------------------------------------
# checkpoints: written atomically, read with weights_only=True


def save_checkpoint(obj, path):
    # Write to a temp file, then rename: a crash mid-write never leaves a half-written ckpt.pt.
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# What each kind of checkpoint must hold for sampling, evaluation or further training to use it;
# resuming needs the optimiser state too (RESUME_KEYS). A file without them is damaged or not ours.
REQUIRED_KEYS = {"vqgan": ("model", "model_config", "config"),
                 "gpt": ("model", "model_config", "config", "vqgan_ckpt", "grid_hw", "conditional", "class_names",
                         "image_size")}
RESUME_KEYS = {"vqgan": ("disc", "disc_config", "opt_g", "opt_d", "step", "rng"),
               "gpt": ("optimizer", "step", "best_val_loss", "rng")}
# the training settings of a VQGAN that train_gpt.py and sample.py read back (its data)
VQGAN_CONFIG_KEYS = ("data", "data_root", "image_size", "seed", "val_fraction")


def load_checkpoint(path, kind, resume=False):
    """Load one of this project's checkpoints, safely (tensors and plain values only), checked
    to hold what a `kind` checkpoint needs (and, resume=True, what --resume needs)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path} (train one first, or give the right path)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        # (empty, truncated and random files all land here, each with torch's first line as the reason)
        raise SystemExit(f"error: {path} is not a checkpoint this project can load safely ({load_error(path, e)}); "
                         f"retrain it or give another file") from None
    return check_kind(ckpt, path, kind, resume)


def check_kind(ckpt, path, kind, resume=False):
    """ckpt, after checking its kind and that it holds the keys (of the right types) a `kind`
    checkpoint needs: else one line naming the file and what is missing."""
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind", "unknown") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SystemExit(f"error: {path} is a {found} checkpoint, not a {kind} checkpoint (check the path)")
    missing = [k for k in REQUIRED_KEYS[kind] + (RESUME_KEYS[kind] if resume else ()) if k not in ckpt]
    if kind == "vqgan" and isinstance(ckpt.get("config"), dict):
        missing += [f"config[{k!r}]" for k in VQGAN_CONFIG_KEYS if k not in ckpt["config"]]
    if missing:
        raise SystemExit(f"error: {path} is a {kind} checkpoint without {', '.join(missing)} (damaged, or written "
                         f"by another version: retrain it or give another file)")
    if not is_state_dict(ckpt["model"]) or not isinstance(ckpt["model_config"], dict) or \
            not isinstance(ckpt["config"], dict):
        raise SystemExit(f"error: {path}: its model, model_config or config is not what train_{kind}.py writes "
                         f"(a damaged file: retrain it or give another)")
    return ckpt


def is_state_dict(sd):
    return isinstance(sd, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())


def state_dict_problems(own, sd):
    """'' if sd has exactly own's keys and shapes, else one line: what is missing, unexpected or
    of the wrong shape (the first few of each)."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in sd and sd[k].shape != own[k].shape]
    return "; ".join(f"{name}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                     for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys)


def build_from_checkpoint(build, ckpt, path, config_key="model_config", weights_key="model"):
    """build(**ckpt[config_key]) filled with ckpt[weights_key]. A config that builds nothing, or
    weights of other keys or shapes than the model it describes, are one line naming the file
    (torch's own errors here are many lines, and a size mismatch would otherwise surface later)."""
    name = getattr(build, "__name__", "model")
    try:
        model = build(**ckpt[config_key])
    except (TypeError, ValueError, KeyError, RuntimeError, ZeroDivisionError, AssertionError) as e:
        raise SystemExit(f"error: {path}: its {config_key} does not describe a {name} ({first_line(e)}); "
                         f"a damaged file: retrain it or give another") from None
    load_weights(model, ckpt[weights_key], path, weights_key)
    return model


def load_weights(module, sd, path, key):
    problems = state_dict_problems(module.state_dict(), sd) if is_state_dict(sd) else "not a dict of tensors"
    if problems:
        raise SystemExit(f"error: {path}: its {key} weights do not fit the {type(module).__name__} its config "
                         f"describes ({problems}); a damaged file: retrain it or give another")
    module.load_state_dict(sd)


def load_optimizer(optimizer, sd, path, key):
    """optimizer.load_state_dict(sd), with its state checked against the parameters' shapes
    (torch checks only the group sizes, and a wrong shape would fail at the first step)."""
    try:
        optimizer.load_state_dict(sd)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise SystemExit(f"error: {path}: its {key} does not fit this model's optimiser ({first_line(e)}); "
                         f"train a new model with another --out_dir") from None
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.dim() and v.shape != p.shape:
                    raise SystemExit(f"error: {path}: its {key} holds a {name} of shape {tuple(v.shape)} for a "
                                     f"parameter of shape {tuple(p.shape)} (a damaged file: train anew)")


def file_digest(path):
    """sha1 of a file's bytes."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_digest(state_dict):
    """sha1 of a state dict's names, shapes, dtypes and values: the same weights give the same
    digest whatever else their checkpoint holds (step, optimiser) or where the file lies."""
    h = hashlib.sha1()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(f"{k} {tuple(t.shape)} {t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Inert:
    """Stands in for every Python object an official checkpoint pickles around its tensors
    (Lightning callbacks, OmegaConf configs, ...): it accepts any arguments and state and does
    nothing with them."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def load_checkpoint_file(path):
    """torch.load(weights_only=True) that also reads the official Lightning checkpoints.

    Those pickle Lightning and OmegaConf objects beside the state dict, which weights_only=True
    refuses, and unpickling them for real could run any code the file names. Instead we
    allow-list exactly the globals the file names, each mapped onto an `Inert` stand-in: the
    tensors load as usual, the rest become empty shells, and nothing from the file ever runs.
    (Lightning and OmegaConf need not be installed either.)"""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path} (download or train one first, or give the right path)")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a zip checkpoint: torch.load below gives the reason
        names = []
    stand_ins = [(type(name.rsplit(".", 1)[-1], (Inert,), {}), name) for name in names]
    try:
        with torch.serialization.safe_globals(stand_ins):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        # also where torch refuses a stand-in outright (globals from os, subprocess, ... are blocked)
        raise SystemExit(f"error: {path} could not be loaded safely as a PyTorch checkpoint ({load_error(path, e)})") from None
    if names:
        print(f"note: {path} pickles {len(names)} Python class(es) besides tensors (e.g. {names[0]}); "
              f"they were loaded as inert stand-ins, none of their code ran")
    return ckpt


def load_error(path, e):
    """Why torch.load refused a file, in a few words: a weights_only refusal names the refused
    global at its end; a broken zip (a truncated file) says so in its first sentence."""
    if os.path.getsize(path) == 0:
        return "the file is empty"
    if isinstance(e, pickle.UnpicklingError):
        return last_line(e)
    return first_line(e).split(". ")[0]


def last_line(e):
    # torch's weights_only errors put the reason (the refused global) at the end
    lines = [line for line in str(e).strip().splitlines() if line.strip() and not line.startswith("Check the doc")]
    return (lines or [type(e).__name__])[-1][:200]


def first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def official_state_dict(ckpt, path):
    """The state dict inside an official Lightning checkpoint ({"state_dict": {...}, ...})."""
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SystemExit(f"error: {path} holds no state dict of tensors (is it a taming-transformers checkpoint?)")
    return sd


def load_official_state_dict(path):
    """The state dict of an official taming-transformers checkpoint, loaded safely (see
    load_checkpoint_file)."""
    return official_state_dict(load_checkpoint_file(path), path)


def config_to_resume(overrides, out_dir, kind, model_keys):
    """The config saved in out_dir/ckpt.pt, after checking that no flag changes the model's shape."""
    saved = load_checkpoint(os.path.join(out_dir, "ckpt.pt"), kind)["config"]
    plain = lambda v: list(v) if isinstance(v, tuple) else v  # checkpoints store tuples as lists
    changed = [k for k in model_keys if k in overrides and plain(overrides[k]) != saved.get(k)]
    if changed:
        raise SystemExit(f"error: --resume with a different {', '.join(changed)} than the checkpoint "
                         f"(drop those flags, or train a new model with another --out_dir)")
    return saved


def config_for_checkpoint(config):
    # Tuples become lists: checkpoints hold plain values that weights_only=True accepts.
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


# -----------------------------------------------------------------------------
# a run that diverges stops at once, with its last good checkpoint intact


def stop_if_not_finite(losses, step, ckpt_path, ddp=False, device="cpu"):
    """One line naming the step when a logged loss is nan or inf. Training on would only spread
    the nan into every weight, and the next checkpoint would overwrite the last good one. Under
    torchrun every process learns of it (a MAX all-reduce), so all stop at the same step
    instead of the others waiting forever for the one that stopped."""
    bad = [f"{k}={v}" for k, v in losses.items() if not math.isfinite(v)]
    if ddp:
        flag = torch.tensor(float(bool(bad)), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = bad or (["in another process"] if flag.item() else [])
    if bad:
        stop_diverged(step, f"the loss is not finite ({', '.join(bad)})", ckpt_path)


def stop_if_weights_not_finite(modules, step, ckpt_path):
    # Checked at each evaluation, before anything samples with the weights or saves them over the
    # last good checkpoint: an update from a finite loss can still overflow a weight.
    if not all(torch.isfinite(p).all() for m in modules for p in m.parameters()):
        stop_diverged(step, "a weight is no longer finite", ckpt_path)


def stop_diverged(step, what, ckpt_path):
    last = f"the last good checkpoint {ckpt_path} is kept" if os.path.isfile(ckpt_path) else "no checkpoint was written"
    raise SystemExit(f"error: step {step}: {what}; training stopped and {last} (lower --lr, or --grad_clip for the "
                     f"GPT, then train again or --resume)")


# -----------------------------------------------------------------------------
# pictures, the learning rate, the log


def save_image_grid(images, path, nrow=8, padding=2):
    """images float (N, 3, H, W) in [-1, 1] -> PNG grid at `path`; returns `path`."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    images = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2
    # grey padding: black would merge with black tiles
    torchvision.utils.save_image(images, path, nrow=nrow, padding=padding, pad_value=0.5)
    return path


def lr_at(step, lr, max_steps, warmup_steps, schedule):
    """The learning rate at `step`, shared by both training scripts. schedule 'cosine': a linear
    warm-up over warmup_steps (Adam's first steps are noisy), then a cosine decay to a tenth of lr
    at max_steps. 'constant': lr throughout, as the official VQGAN trains."""
    if schedule == "constant":
        return lr
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def append_log(path, row):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
