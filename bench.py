"""
Measure taming-mini's speed and memory on this machine, and compare with the official
implementation (CompVis/taming-transformers), timed on a 2-vCPU Xeon (AVX-512, fp32, 2 threads) and
kept below as OFFICIAL figures; RESULTS.md has the tables and how they were taken.

    python bench.py                          # --config=shapes: the built-in data's models + the official rows
    python bench.py --config=tiny            # seconds: a smoke test of every measurement
    python bench.py --config=paper           # the paper's VQGAN (256x256) and GPT (24 x 1024) at batch 1
    python bench.py --config=paper --batch_size=2 --json=out/bench_paper_b2.json
    bash .ci/gpu_check.sh                    # --config=gpu: the GPU check (CUDA, bf16) with its targets, < 8 min on an H200

Every row runs in a fresh child process, so its peak memory is its own: on CUDA
torch.cuda.max_memory_allocated, on the CPU the child's peak resident set (VmHWM: the whole
process, Python and torch included, as the official figures were measured). Times are the median
of `iters` timed repetitions after `warmup` untimed ones. Prints one table; --json=PATH writes it.
A row that fails (a compile error, out of memory) keeps its one-line error in the table and the next row runs.
"""

import json
import multiprocessing
import os
import statistics
import sys
import time
from contextlib import redirect_stdout

import torch

# -----------------------------------------------------------------------------
# Hyperparameters, each overridable as --name=value (see --help)
CONFIG = dict(
    config="shapes",          # tiny (a smoke test) | shapes (the built-in data's models + the official rows) | paper
                              # | gpu (CUDA + bf16 only: paper models, compile and channels-last on/off, PASS/MISS targets)
    batch_size=1,             # batch of the paper rows (VQGAN images, GPT sequences); the others (gpu too) set their own
    device="auto",            # auto = cuda, then cpu (MPS is not measured)
    dtype="auto",             # auto = bf16 autocast on CUDA (fp16 without bf16), fp32 on the CPU; or float32
    threads=0,                # torch.set_num_threads in each child; 0 = torch's default (OMP_NUM_THREADS or the cores)
    warmup=1,                 # untimed repetitions before timing (first-call allocations, autotuning)
    iters=3,                  # timed repetitions; the median is reported
    uncached_tokens=32,       # sampling without the KV cache costs O(n^2): time only its first tokens (gpu: all)
    grad_checkpointing=False, # recompute blocks in backward (the 12 GB measurements)
    compile=False,            # torch.compile the trained models (needs a C++ compiler; long first step); gpu: per row
    peak_tflops=0.0,          # the device's peak TFLOP/s for MFU; 0 = known GPUs only (A100, H100, H200), none on CPUs
    time_limit=0.0,           # seconds for all rows together; a row past it is killed or not started (and says so); 0 = none
    json="",                  # also write the rows to this file (after every row, so a killed run keeps what it measured)
)

# The models measured. *_OFFICIAL are the configurations the official code was timed in, so those rows compare directly.
VQGAN_TINY = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=8, embed_dim=4,
                  n_codes=16, disc_ndf=8, disc_layers=2)
VQGAN_SHAPES = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), z_channels=64,
                    embed_dim=8, n_codes=256, disc_ndf=32, disc_layers=3)  # train_vqgan.py's defaults
VQGAN_OFFICIAL = dict(ch=64, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=64,
                      embed_dim=64, n_codes=256, disc_ndf=64, disc_layers=3)
VQGAN_PAPER = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), z_channels=256,
                   embed_dim=256, n_codes=1024, disc_ndf=64, disc_layers=3)
GPT_TINY = dict(n_layer=2, n_head=2, n_embd=32, n_codes=64)
GPT_SHAPES = dict(n_layer=4, n_head=4, n_embd=128, n_codes=256)     # train_gpt.py's defaults (8x8 grids)
GPT_OFFICIAL = dict(n_layer=8, n_head=8, n_embd=512, n_codes=1024)  # 26.4M parameters, block 257
GPT_PAPER = dict(n_layer=24, n_head=16, n_embd=1024, n_codes=1024)  # the faces/depth transformer, block 512


def rows_for(config_name, b):
    """(label, measurement, its arguments, official figure or None) for one --config."""
    def vq(label, model, size, batch, lpips, after, official=None):
        return (label, "vqgan_step", dict(model=model, image_size=size, batch_size=batch, lpips=lpips, after=after), official)

    nearest = [(f"nearest code, K={k}, {how}", "nearest_code", dict(n_codes=k, how=how),
                dict(official={1024: 11.0, 16384: 261.0}[k], unit="ms") if how == "ours" else None)
               for k in (1024, 16384) for how in ("ours", "cdist")]
    if config_name == "tiny":
        return [vq("VQGAN tiny 16x16 b8, LPIPS, before disc_start", VQGAN_TINY, 16, 8, True, False),
                vq("VQGAN tiny 16x16 b8, LPIPS, after disc_start", VQGAN_TINY, 16, 8, True, True),
                ("GPT tiny train, b16 x 256 tokens", "gpt_train", dict(model=GPT_TINY, batch_size=16, grid=16), None),
                ("GPT tiny sampling 16x16 b16", "gpt_sample", dict(model=GPT_TINY, batch_size=16, grid=16), None),
                ("GPT tiny sliding window 32x32 b4", "sliding", dict(model=GPT_TINY, batch_size=4, grid=32, window=16), None),
                ] + nearest
    if config_name == "shapes":
        off = lambda s: dict(official=s, unit="s")
        return [vq("VQGAN shapes 32x32 b16, LPIPS, before disc_start", VQGAN_SHAPES, 32, 16, True, False),
                vq("VQGAN shapes 32x32 b16, LPIPS, after disc_start", VQGAN_SHAPES, 32, 16, True, True),
                vq("VQGAN official-32 b32, no LPIPS, before disc_start", VQGAN_OFFICIAL, 32, 32, False, False, off(1.22)),
                vq("VQGAN official-32 b32, no LPIPS, after disc_start", VQGAN_OFFICIAL, 32, 32, False, True, off(1.23)),
                vq("VQGAN official-32 b32, LPIPS, after disc_start", VQGAN_OFFICIAL, 32, 32, True, True, off(1.92)),
                ("GPT shapes train, b64 x 64 tokens", "gpt_train", dict(model=GPT_SHAPES, batch_size=64, grid=8), None),
                ("GPT official-26M train, b16 x 256 tokens", "gpt_train", dict(model=GPT_OFFICIAL, batch_size=16, grid=16),
                 dict(official=1295.0, unit="tok/s")),
                ("GPT official-26M sampling 16x16 b16", "gpt_sample", dict(model=GPT_OFFICIAL, batch_size=16, grid=16),
                 dict(official=294.0, unit="tok/s")),
                ("GPT shapes sliding window 32x32 (8x8 window) b4", "sliding",
                 dict(model=GPT_SHAPES, batch_size=4, grid=32, window=8), None),
                ] + nearest
    if config_name == "paper":
        official = {1: 11.3, 2: 26.3}.get(b)
        return [vq(f"VQGAN paper 256x256 b{b}, LPIPS, before disc_start", VQGAN_PAPER, 256, b, True, False),
                vq(f"VQGAN paper 256x256 b{b}, LPIPS, after disc_start", VQGAN_PAPER, 256, b, True, True,
                   dict(official=official, unit="s") if official else None),
                (f"GPT paper-size (24 x 1024) train, b{b} x 512 tokens", "gpt_train",
                 dict(model=GPT_PAPER, batch_size=b, grid=None, seq_len=511), None)]
    if config_name == "gpu":
        return gpu_rows()
    raise SystemExit(f"error: --config={config_name} is not one of tiny, shapes, paper, gpu")


def gpu_rows():
    """The GPU check (issue 18): each row sets its own compile / channels_last (ROW_SETTINGS). Eager rows first,
    then the compile rows, which spend a minute or more compiling: under --time_limit the rows the targets need
    most get measured first, and the ones past it say so."""
    on = lambda flag: "on" if flag else "off"

    def vq(b, compile, channels_last):
        return (f"VQGAN paper 256x256 b{b}, LPIPS + disc, compile {on(compile)}, channels-last {on(channels_last)}",
                "vqgan_step", dict(model=VQGAN_PAPER, image_size=256, batch_size=b, lpips=True, after=True,
                                   compile=compile, channels_last=channels_last), None)

    def train(b, compile):
        return (f"GPT paper-size (24 x 1024) train, b{b} x 512 tokens, compile {on(compile)}", "gpt_train",
                dict(model=GPT_PAPER, batch_size=b, grid=None, seq_len=511, compile=compile), None)

    def sample(compile):  # uncached over the whole grid: the target compares the two at 16x16, not a prefix
        return (f"GPT paper-size sampling 16x16 b8, compile {on(compile)}", "gpt_sample",
                dict(model=GPT_PAPER, batch_size=8, grid=16, uncached_tokens=256, compile=compile), None)

    eager = [vq(b, False, cl) for b in (4, 8) for cl in (True, False)] + [train(2, False), train(8, False), sample(False)]
    compiled = [train(2, True), train(8, True)] + [vq(b, True, cl) for cl in (True, False) for b in (4, 8)] + [sample(True)]
    return eager + compiled


# The GPU check's targets: (what, the rows it judges, their figure, "<" or ">=", the bound, how to print it).
# The best successful row decides: a target asks whether some setting reaches it. GiB = 2**30 bytes.
GPU_TARGETS = [
    ("paper VQGAN batch>=4 peak memory < 12 GiB", lambda r: r["measurement"] == "vqgan_step" and r["args"]["batch_size"] >= 4,
     lambda r: r["memory_mb"] / 1024, "<", 12.0, "{:.2f} GiB"),
    ("paper GPT batch>=2 peak memory < 12 GiB", lambda r: r["measurement"] == "gpt_train" and r["args"]["batch_size"] >= 2,
     lambda r: r["memory_mb"] / 1024, "<", 12.0, "{:.2f} GiB"),
    ("paper GPT training MFU >= 40%", lambda r: r["measurement"] == "gpt_train" and "mfu" in r,
     lambda r: r["mfu"], ">=", 0.40, "{:.1%}"),
    ("sampling 16x16: cached >= 10x uncached tok/s", lambda r: r["measurement"] == "gpt_sample",
     lambda r: r["value"] / r["uncached_tok_s"], ">=", 10.0, "{:.1f}x"),
]


def check_targets(results):
    """[(passed, "PASS|MISS what: figure (the deciding row)")] for GPU_TARGETS; a target no row measured MISSes."""
    out = []
    for what, judged, figure, op, bound, fmt in GPU_TARGETS:
        rows = [r for r in results if "error" not in r and judged(r)]
        if not rows:
            out.append((False, f"MISS {what}: no row measured it"))
            continue
        best = (min if op == "<" else max)(rows, key=figure)
        passed = figure(best) < bound if op == "<" else figure(best) >= bound
        out.append((passed, f"{'PASS' if passed else 'MISS'} {what}: {fmt.format(figure(best))} ({best['label']})"))
    return out


# -----------------------------------------------------------------------------
# Measurements. Each runs in its own child process and returns a dict of figures.


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with open("/proc/self/status") as f:  # VmHWM: the peak resident set of this (child) process
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def timed(fn, device, warmup, iters):
    """Median seconds of fn() over iters runs after warmup runs."""
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def vqgan_step(env, model, image_size, batch_size, lpips, after):
    """One full training step of train_vqgan.py: G step (L1 + LPIPS + VQ, + lambda * GAN after
    disc_start), then the D step after disc_start. Returns images/s, s/step, peak memory."""
    from lpips_lite import LPIPS
    from utils import wrap_for_training
    from vqgan import VQGAN, Discriminator
    from vqgan_loss import adam, train_step
    device, dtype = env["device"], env["dtype"]
    d_args = dict(ndf=model["disc_ndf"], n_layers=model["disc_layers"])
    vq = VQGAN(resolution=image_size, **{k: v for k, v in model.items() if not k.startswith("disc_")}).to(device)
    disc = Discriminator(**d_args).to(device)
    vq.encoder.grad_checkpointing = vq.decoder.grad_checkpointing = env["grad_checkpointing"]
    with redirect_stdout(None):  # LPIPS's notice about its 1x1 weights, once per child
        lp = LPIPS(pretrained=env["lpips_pretrained"]).to(device) if lpips else None
    if env["channels_last"]:
        vq.to(memory_format=torch.channels_last)
        disc.to(memory_format=torch.channels_last)
    opt_g, opt_d = adam(vq.parameters(), 1e-4, device), adam(disc.parameters(), 1e-4, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    wrap = dict(compile=env["compile"])
    train_vq, train_disc = (wrap_for_training(m, wrap, False, device) for m in (vq, disc))
    # the paper's loss: L1 + LPIPS, Eq. (7)'s lambda times disc_weight 0.8
    losses = dict(semantic=False, pixel_loss_kind="l1", perceptual_weight=1.0 if lpips else 0.0, adaptive_lambda=True,
                  disc_weight=0.8)
    x = torch.rand(batch_size, 3, image_size, image_size, device=device) * 2 - 1
    if env["channels_last"]:  # the layout train_vqgan.py feeds the channels-last models
        x = x.to(memory_format=torch.channels_last)
    step = lambda: train_step(train_vq, train_disc, lp, opt_g, opt_d, scaler, x, 1e-4, after, losses, device, dtype)
    seconds = timed(step, device, env["warmup"], env["iters"])
    return dict(value=batch_size / seconds, unit="img/s", seconds=seconds, memory_mb=peak_memory_mb(device))


def gpt_flops_per_token(model_args, seq_len, n_params):
    # forward + backward: 6 FLOPs per parameter per token, plus attention's 12 * layers * width * T
    # (the estimate of the PaLM paper's appendix B, as in nanoGPT)
    return 6 * n_params + 12 * model_args["n_layer"] * model_args["n_embd"] * seq_len


def gpt_train(env, model, batch_size, grid, seq_len=None):
    """One AdamW step of train_gpt.py's loss on random tokens. Returns tokens/s, memory, MFU."""
    from gpt import GPT, gpt_loss
    from utils import autocast, wrap_for_training
    device, dtype = env["device"], env["dtype"]
    seq_len = seq_len or grid * grid  # image tokens per sequence; +1 start token, -1 shifted target
    gpt = GPT(block_size=seq_len + 1, **model).to(device)  # + the start token, as train_gpt.py
    gpt.grad_checkpointing = env["grad_checkpointing"]
    opt = gpt.configure_optimizer(1e-4)
    train_model = wrap_for_training(gpt, dict(compile=env["compile"]), False, device)
    seq = torch.randint(0, model["n_codes"], (batch_size, seq_len + 1), device=device)
    seq[:, 0] = model["n_codes"]  # the start token

    def step():
        with autocast(device, dtype):
            loss = gpt_loss(train_model(seq[:, :-1]), seq, n_cond=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    seconds = timed(step, device, env["warmup"], env["iters"])
    tokens_per_s = batch_size * seq_len / seconds
    n_params = sum(p.numel() for p in gpt.parameters())
    out = dict(value=tokens_per_s, unit="tok/s", seconds=seconds, memory_mb=peak_memory_mb(device),
               params_m=n_params / 1e6)
    if env["peak_flops"]:
        out["mfu"] = gpt_flops_per_token(model, seq_len, n_params) * tokens_per_s / env["peak_flops"]
    return out


def gpt_sample(env, model, batch_size, grid):
    """Sample a grid x grid token grid with the KV cache, and the first uncached_tokens of it
    without (O(n^2)); in fp32 the two give the same tokens for the same seed (under bf16 they round differently)."""
    from gpt import GPT
    from utils import autocast
    device, n = env["device"], grid * grid
    gpt = GPT(block_size=n + 1, **model).to(device).eval()
    if env["compile"]:
        gpt.compile()  # in place: generate calls the module itself
    cond = torch.full((batch_size, 1), model["n_codes"], device=device)
    m = min(env["uncached_tokens"], n)

    def sample(n_new, use_cache):
        g = torch.Generator(device=device).manual_seed(0)
        with autocast(device, env["dtype"]):
            return gpt.generate(cond, n_new, top_k=100, generator=g, use_cache=use_cache)

    if env["warmup"]:  # first-call costs (cuBLAS set-up, compiling) out of the single timed run of each
        sample(n, True), sample(min(m, 8), False)
    out = {}
    seconds = timed(lambda: out.update(cached=sample(n, True)), device, 0, 1)
    seconds_uncached = timed(lambda: out.update(uncached=sample(m, False)), device, 0, 1)
    same = bool(torch.equal(out["cached"][:, :m], out["uncached"]))
    return dict(value=batch_size * n / seconds, unit="tok/s", seconds=seconds, memory_mb=peak_memory_mb(device),
                uncached_tok_s=batch_size * m / seconds_uncached, uncached_tokens=m, same_tokens=same)


def sliding(env, model, batch_size, grid, window):
    """Sliding-window sampling (Sec. 3.2) of a grid x grid token grid with a window x window model."""
    from gpt import GPT, sample_sliding_window
    device = env["device"]
    gpt = GPT(block_size=window * window + 1, **model).to(device).eval()
    cond = torch.full((batch_size, 1), model["n_codes"], device=device)
    g = torch.Generator(device=device).manual_seed(0)
    seconds = timed(lambda: sample_sliding_window(gpt, cond, grid, grid, window, window, top_k=100, generator=g),
                    device, 0, 1)
    return dict(value=batch_size * grid * grid / seconds, unit="tok/s", seconds=seconds, memory_mb=peak_memory_mb(device))


def nearest_code_search(env, n_codes, how):
    """Eq. (2) at the paper's latent size z (8, 256, 16, 16): our one-matmul nearest_code, or the
    naive torch.cdist. Returns ms and the memory the search adds over its inputs."""
    from vqgan import nearest_code
    device = env["device"]
    torch.manual_seed(0)
    z = torch.randn(8 * 16 * 16, 256, device=device)
    codebook = torch.randn(n_codes, 256, device=device)
    search = (lambda: nearest_code(z, codebook)) if how == "ours" else (lambda: torch.cdist(z, codebook).argmin(1))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM to the current resident set
            f.write("5")
        before = peak_memory_mb(device)
    seconds = timed(search, device, env["warmup"], max(env["iters"], 5))
    return dict(value=seconds * 1e3, unit="ms", seconds=seconds, memory_mb=peak_memory_mb(device) - before,
                memory_is_extra=True)


MEASUREMENTS = dict(vqgan_step=vqgan_step, gpt_train=gpt_train, gpt_sample=gpt_sample, sliding=sliding,
                    nearest_code=nearest_code_search)


ROW_SETTINGS = ("compile", "channels_last", "uncached_tokens")  # a row's kwargs may set these for itself (--config=gpu)


def run_in_child(env, name, kwargs):
    """The body of a child process: set it up like the parent said, run one measurement."""
    if env["threads"]:
        torch.set_num_threads(env["threads"])
    env = dict(env, device=torch.device(env["device"]), dtype=getattr(torch, env["dtype"]) if env["dtype"] else None,
               **{k: kwargs[k] for k in ROW_SETTINGS if k in kwargs})
    kwargs = {k: v for k, v in kwargs.items() if k not in ROW_SETTINGS}
    torch.manual_seed(0)
    return MEASUREMENTS[name](env, **kwargs)


def child_main(conn, env, name, kwargs):
    # Any failure comes back as one line instead of an exception, so the parent's table goes on.
    try:
        conn.send(run_in_child(env, name, kwargs))
    except BaseException as e:  # noqa: BLE001 - compile errors, out of memory, ...
        from utils import first_line
        conn.send(dict(error=f"{type(e).__name__}: {first_line(e)}"))


def run_row(env, name, kwargs, timeout=None):
    """One measurement in a fresh process -> its figures, or {"error": one line} where it failed, died or ran
    past `timeout` seconds (then it is killed). The processes come from a clean fork server (which never touches
    CUDA), so each row's peak memory is its own and no row inherits another's allocations."""
    ctx = multiprocessing.get_context("forkserver")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=child_main, args=(send, env, name, kwargs))
    child.start()
    send.close()  # only the child holds it now: when the child dies, recv() raises EOFError instead of waiting
    answered = receive.poll(timeout)  # also True when the child died
    try:
        r = receive.recv() if answered else dict(error=f"killed after {timeout:.0f} s: --time_limit")
    except EOFError:
        r = None
    if answered:
        child.join(5)  # it exits by itself once it has answered (a child slow to tear down is killed)
    child.kill()  # a no-op for a child that has exited
    child.join()
    return r or dict(error=f"the child process died (exit code {child.exitcode})")


# -----------------------------------------------------------------------------
# The parent: decide the device, run every row in a fresh process, print the table


def lpips_weights_cached():
    # Look for torchvision's VGG16 file in the hub cache instead of trying (and waiting for) a download.
    from torchvision.models import VGG16_Weights
    name = os.path.basename(VGG16_Weights.IMAGENET1K_V1.url)
    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", name))


def known_peak_flops(device, dtype, given_tflops):
    if given_tflops > 0:
        return given_tflops * 1e12
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return bf16_peak_flops(name) if dtype is not None else 0.0  # fp32 peaks are another story: no MFU


def bf16_peak_flops(device_name):
    # dense bf16/fp16 tensor-core peaks by device name (H100 SXM; the H200 has the H100's compute, more memory)
    bf16 = {"A100": 312e12, "H100": 989e12, "H200": 989e12}
    return next((v for k, v in bf16.items() if k in device_name), 0.0)


def cpu_model_and_flags():
    """(model name, set of flags) from /proc/cpuinfo; ("unknown", set()) where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            first_cpu = f.read().split("\n\n")[0]  # one block per core; they agree on these fields
    except OSError:  # not Linux
        return "unknown", set()
    fields = {}
    for line in first_cpu.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields.get("model name", "unknown"), set(fields.get("flags", "").split())


def baseline_mismatch(device, dtype, threads, cpu_model, cpu_flags):
    """Why this run's ratios would compare two different machines, or "" when it is the kind the official
    figures were taken on: the official figures were taken on a 2-vCPU Xeon with AVX-512, fp32, 2 threads. The same
    code runs 2-3x slower on an AVX2-only EPYC, so a ratio against another machine means nothing."""
    if device.type != "cpu":
        return f"this is {device.type}, the official figures are CPU ones"
    if dtype is not None:
        return f"this run is {str(dtype).replace('torch.', '')}, the official figures are fp32"
    if threads != 2:
        return f"this run uses {threads} threads, the official figures 2"
    if "Xeon" not in cpu_model or "avx512f" not in cpu_flags:
        return f"this CPU is {cpu_model}{'' if 'avx512f' in cpu_flags else ' without AVX-512'}, not a Xeon with AVX-512"
    return ""


def format_row(label, r, official, comparable=True):
    if "error" in r:
        return [label, "failed", "", "", "", r["error"]]
    value = f"{r['value']:.{1 if r['value'] >= 10 else 3}f} {r['unit']}"
    extra = ""
    if r["unit"] == "img/s":
        extra = f"{r['seconds']:.3f} s/step"
    if "same_tokens" in r:
        extra = (f"uncached {r['uncached_tok_s']:.1f} tok/s (first {r['uncached_tokens']} tokens), cached "
                 f"{r['value'] / r['uncached_tok_s']:.1f}x; same tokens: {'yes' if r['same_tokens'] else 'NO'}")
    if "mfu" in r:
        extra = f"MFU {r['mfu']:.1%}"
    if "params_m" in r:
        extra = (extra + "; " if extra else "") + f"{r['params_m']:.2f}M params"
    memory = f"{'+' if r.get('memory_is_extra') else ''}{r['memory_mb']:.0f} MB"
    off, ratio = "", ""
    if official:
        # ratio > 1 means faster than the official code
        if official["unit"] == "s":
            off, ratio = f"{official['official']:.2f} s/step", official["official"] / r["seconds"]
        elif official["unit"] == "ms":
            off, ratio = f"{official['official']:.0f} ms", official["official"] / r["value"]
        else:
            off, ratio = f"{official['official']:.0f} {official['unit']}", r["value"] / official["official"]
        ratio = f"{ratio:.2f}x" if comparable else "n/a: other machine"
    return [label, value, memory, off, ratio, extra]


def check_config(config):
    if config["batch_size"] < 1 or config["iters"] < 1 or config["warmup"] < 0 or config["uncached_tokens"] < 1 \
            or config["time_limit"] < 0:
        raise SystemExit("error: --batch_size, --iters and --uncached_tokens must be >= 1, --warmup and --time_limit >= 0")
    if config["threads"] < 0 or config["peak_tflops"] < 0:
        raise SystemExit("error: --threads and --peak_tflops must be 0 (the default: automatic) or more")
    rows_for(config["config"], config["batch_size"])  # an unknown --config is one line here, before anything runs


def main(argv):
    from utils import parse_overrides, pick_device, pick_dtype
    config = dict(CONFIG, **parse_overrides(CONFIG, argv, __file__))
    check_config(config)
    gpu_check = config["config"] == "gpu"
    wants_cuda = config["device"] == "auto" or config["device"].startswith("cuda")
    if gpu_check and not (wants_cuda and torch.cuda.is_available()):
        refuse(f"the GPU check (--config=gpu) needs CUDA, and this run is not on it (--device={config['device']}"
               f"{'' if torch.cuda.is_available() else ', no CUDA here'}): run bash .ci/gpu_check.sh on a GPU machine")
    device = pick_device(config["device"])
    if device.type == "mps":
        raise SystemExit("error: bench.py measures CUDA or the CPU (use --device=cpu)")
    dtype = pick_dtype(config["dtype"], device)
    if gpu_check and dtype != torch.bfloat16:
        refuse(f"the GPU check measures bf16 autocast, and this run is {str(dtype or 'float32').replace('torch.', '')} "
               f"(--dtype={config['dtype']}: use auto or bfloat16, on a GPU with bf16)")
    rows = rows_for(config["config"], config["batch_size"])
    lpips_pretrained = lpips_weights_cached()
    env = dict(device=str(device), dtype=str(dtype).replace("torch.", "") if dtype else "",
               lpips_pretrained=lpips_pretrained, peak_flops=known_peak_flops(device, dtype, config["peak_tflops"]),
               channels_last=device.type == "cuda",  # train_vqgan.py's layout on CUDA
               **{k: config[k] for k in ("threads", "warmup", "iters", "uncached_tokens", "grad_checkpointing", "compile")})
    threads = config["threads"] or torch.get_num_threads()
    cpu_model, cpu_flags = cpu_model_and_flags()
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_model}, {os.cpu_count()} cores"
    print(f"bench.py --config={config['config']}: {what}, torch {torch.__version__}, "
          f"{env['dtype'] or 'float32'}, {threads} thread(s), {time.strftime('%Y-%m-%d %H:%M')}")
    if not lpips_pretrained:
        print("note: torchvision's VGG16 weights are not cached here (offline), so LPIPS uses random VGG "
              "features: the same cost as the real LPIPS, not the same loss")
    print("note: official = CompVis/taming-transformers on a 2-vCPU Xeon, fp32, 2 threads, quiet machine "
          "(RESULTS.md); ratio > 1 = faster than official")
    mismatch = baseline_mismatch(device, dtype, threads, cpu_model, cpu_flags)
    if mismatch:
        print(f"note: no ratios: {mismatch}; to compare, time the official code on this machine too")

    def save(**more):
        if config["json"]:
            os.makedirs(os.path.dirname(config["json"]) or ".", exist_ok=True)
            with open(config["json"], "w") as f:
                json.dump(dict(config=config, machine=what, torch=torch.__version__, threads=threads,
                               date=time.strftime("%Y-%m-%d %H:%M"), lpips_pretrained=lpips_pretrained,
                               no_ratios_because=mismatch, rows=results, **more),
                          f, indent=1, default=str)

    deadline = time.monotonic() + config["time_limit"] if config["time_limit"] else None
    results, table = [], []
    for label, name, kwargs, official in rows:
        start = time.monotonic()
        if deadline is not None and start >= deadline:
            r = dict(error=f"not run: the --time_limit={config['time_limit']:g} s was spent")
        else:
            r = run_row(env, name, kwargs, None if deadline is None else deadline - start)
        results.append(dict(label=label, measurement=name, args=kwargs, official=official,
                            wall_s=round(time.monotonic() - start, 1), **r))
        table.append(format_row(label, r, official, comparable=not mismatch))
        save()
        print(f"  {'failed' if 'error' in r else 'measured'}: {label} ({time.monotonic() - start:.0f} s)", file=sys.stderr)
    header = ["what", "ours", "peak memory", "official", "ratio", "notes"]
    widths = [max(len(str(row[i])) for row in table + [header]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths]] + table:
        print(" | ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    print("peak memory: CUDA max_memory_allocated; CPU the child process's peak resident set (VmHWM), "
          "+ = added by the search alone")
    targets = check_targets(results) if gpu_check else []
    for _, line in targets:
        print(line)
    save(**(dict(targets=[dict(passed=p, line=line) for p, line in targets]) if gpu_check else {}))
    if config["json"]:
        print(f"wrote {config['json']}")


def refuse(why):
    # a run that cannot measure what was asked: one line, exit code 2 (a usage error, not a failed measurement)
    print(f"error: {why}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    from utils import run_script
    run_script(main)
