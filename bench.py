"""
Benchmarks, one section per part of the system: `python bench.py <what>`.

    python bench.py fp8 [--profile=DIR]
                            fine-grained FP8 (fp8.py): GEMMs against BF16 and cuBLAS's blockwise
                            FP8, quantization bandwidth against a device copy, FP8Linear and the
                            grouped expert GEMMs forward+backward against BF16, the experts' whole
                            SwiGLU (eager and compiled), and the promotion emulation of 3.3.2 (that
                            last part also runs on the CPU)

    python bench.py memory [--preset=small --batch_size=4 --seq_len=2048]
                            activation recomputation (3.2.3): peak GPU memory and step time of
                            forward+backward with recompute off and on, and whether the gradients agree
    python bench.py step [--preset=small --batch_size=16 --seq_len=2048 --fp8=0 --compile=1 --recompute=0 --graphs=0
                          --clip=0 --route=auto --top=30]
                            one training step (forward, backward, optimizer), BF16 or with FP8
                            GEMMs, compiled (model and AdamW) or eager (--graphs=1: replayed as CUDA
                            graphs; --clip=1: with train.py's gradient clipping; --route=torch: the
                            router's three torch.topk calls, not its kernel, moe.route_impl): the first step's
                            time (compilation), torch.compile's graphs and graph breaks, the step's
                            time and MFU, then where the time goes under the profiler: GPU busy time
                            against wall time, kernel time by kind, the top kernels (--top=N of them)
    torchrun --nproc_per_node=8 bench.py ep [--tokens=4096 --dim=7168 --topk=8 --experts=256 --local_world=4]
                            expert parallelism (comm.py): dispatch and combine GB/s per rank against a raw
                            all_to_all_single of the same bytes, BF16 and FP8, flat and hierarchical
                            (--local_world=L: every L ranks a node); the MoE layer with and without the
                            shared-expert overlap; the all-to-all capped at --channels=4,8,16,24,32 CTAs
                            (a fresh communicator per cap); on one process the permutations alone against
                            the device copy. Runs under gloo on the CPU too (small flags, e.g. --dim=256)
    torchrun --nproc_per_node=4 bench.py pipeline [--preset=nano --batch_size=2 --seq_len=64 --chunks=8]
                            DualPipe, its F&B pairs as F then B and overlapped, against 1F1B (dualpipe.py):
                            per-stage F, B, W, F&B times, step times, each rank's idle time against
                            simulate()'s; on one process one stage's F, B, W and an overlapped F&B pair
                            against F then B, and the bubbles simulate() predicts from them at PP 4 and 8
                            (CPU or GPU)
    python bench.py decode [--preset=nano --ckpt=out --batch_sizes=1,32 --prompt_len=32 --new_tokens=64 --rows=]
                            decoding tokens/s and ms per step: generate(), decode()'s static cache,
                            the same captured as CUDA graphs, and compiled then captured, MTP speculative
                            decoding likewise (its acceptance rate), transformers' generate() on the
                            exported weights (--rows=a,b: only the methods named so); CPU or GPU (the
                            CUDA-graph rows are skipped on the CPU)

Timings are medians of triton.testing.do_bench (CUDA events, L2 flushed between runs), except
`step`, which averages 5 steps between two CUDA events.
"""

import datetime
import re
import sys
import time

import torch


def _header(title):
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"== {title} | {datetime.datetime.now():%Y-%m-%d %H:%M} | {dev} | torch {torch.__version__}", end="")
    try:
        import triton
        print(f" | triton {triton.__version__}")
    except ImportError:
        print(" | no triton")


def _profile(step, path):
    """One profiled call of step(): the CUDA kernels and their times, written to path."""
    from torch.profiler import ProfilerActivity, profile
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))


def bench_fp8(profile_dir=None):
    """profile_dir: also write torch.profiler tables of the FP8Linear and expert steps there."""
    import torch.nn as nn

    import fp8
    _header("bench fp8")

    print("\n-- promotion (3.3.2): emulated 14-bit accumulator, K=4096, relative error vs FP64")
    for positive in (True, False):
        plain, promoted = fp8.promotion_error(K=4096, positive=positive)
        kind = "U(0,1) operands" if positive else "N(0,1) operands"
        print(f"{kind}: no promotion {plain:.3%}, promotion every 128 {promoted:.4%} ({plain / promoted:.0f}x less)")
    if not torch.cuda.is_available():
        print("\n(no CUDA: the GPU sections are skipped)")
        return

    from triton.testing import do_bench
    ms = lambda f, **kw: do_bench(f, warmup=25, rep=100, return_mode="median", **kw)
    bf16, dev = torch.bfloat16, "cuda"
    torch.manual_seed(0)

    src = torch.randn(1 << 29, device=dev, dtype=bf16)              # 1 GiB
    dst = torch.empty_like(src)
    copy_bw = 2 * src.nbytes / ms(lambda: dst.copy_(src)) / 1e6      # GB/s, bytes read + written
    a, b = torch.randn(8192, 8192, device=dev, dtype=bf16), torch.randn(8192, 8192, device=dev, dtype=bf16)
    peak = 2 * 8192 ** 3 / ms(lambda: a @ b) / 1e9
    print(f"\n-- ceilings: device copy {copy_bw / 1e3:.2f} TB/s, BF16 matmul 8192^3 {peak:.0f} TFLOP/s")
    print(f"   fp8.gemm_impl={fp8.gemm_impl!r} resolves to "
          f"{'scaled_mm' if fp8._scaled_mm_works(torch.device(dev)) else 'triton'} on this GPU")

    print("\n-- GEMM TFLOP/s (Fprop: x 1x128 . W 128x128; Wgrad: dy^T 1x128 . x^T 1x128 over tokens)")
    print(f"{'M':>6} {'K':>6} {'N':>6} | {'BF16':>5} | {'cuBLAS':>6} {'triton':>6} | "
          f"{'tri/BF16':>8} {'tri/cuBLAS':>10} {'cuBLAS/BF16':>11} | {'Wgrad cuBLAS':>12} {'triton':>6} | triton config")
    for M, K, N in ((4096, 7168, 7168), (16384, 7168, 2048), (16384, 2048, 7168)):
        flop = 2 * M * N * K
        x, w = torch.randn(M, K, device=dev, dtype=bf16), torch.randn(N, K, device=dev, dtype=bf16)
        x8, xs = fp8.act_quant(x)
        w8, ws = fp8.weight_quant(w)
        t_bf = ms(lambda: x @ w.t())
        t_tr = ms(lambda: fp8.fp8_gemm_triton(x8, xs, w8, ws))
        cfg = fp8._fp8_gemm_kernel.best_config
        try:
            t_cu = ms(lambda: fp8.fp8_gemm_scaled_mm(x8, xs, w8, ws))
        except RuntimeError as e:
            t_cu = float("nan")
            print("   scaled_mm:", str(e).splitlines()[0])
        dy = torch.randn(M, N, device=dev, dtype=bf16)
        dyT, dyTs = fp8.act_quant_t(dy)
        xT, xTs = fp8.act_quant_t(x)
        w_tr = ms(lambda: fp8.fp8_gemm_triton(dyT, dyTs, xT, xTs, torch.float32))
        try:
            w_cu = ms(lambda: fp8.fp8_gemm_scaled_mm(dyT, dyTs, xT, xTs, torch.float32))
        except RuntimeError as e:
            w_cu = float("nan")
            print("   scaled_mm wgrad:", str(e).splitlines()[0])
        tf = lambda t: flop / t / 1e9
        print(f"{M:>6} {K:>6} {N:>6} | {tf(t_bf):>5.0f} | {tf(t_cu):>6.0f} {tf(t_tr):>6.0f} | {t_bf / t_tr:>8.2f} "
              f"{t_cu / t_tr:>10.2f} {t_bf / t_cu:>11.2f} | {tf(w_cu):>12.0f} {tf(w_tr):>6.0f} | "
              f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}")

    print(f"\n-- quantization GB/s (bytes read + written) against the copy's {copy_bw:.0f}")
    x = torch.randn(16384, 7168, device=dev, dtype=bf16)
    x8, xs = fp8.act_quant(x)
    x8p, xsp = fp8.act_quant(x, pow2=True)
    w = torch.randn(7168, 18432, device=dev)                          # v3-gpu's dense W1 (N, K)
    w8 = fp8.weight_quant(w)[0]
    n, nw = x.numel(), w.numel()
    cases = (("act_quant     1x128, BF16 in", "x 16384x7168", lambda: fp8.act_quant(x), n * 3 + n // 32),
             ("act_quant_t   128x1, BF16 in", "x 16384x7168", lambda: fp8.act_quant_t(x), n * 3 + n // 32),
             ("act_quant_t   128x1, FP8 cache in", "x 16384x7168", lambda: fp8.act_quant_t(x8, xs), n * 2 + n // 16),
             ("  power-of-two scales (the experts')", "x 16384x7168", lambda: fp8.act_quant_t(x8p, xsp, pow2=True),
              n * 2 + n // 16),
             ("act_quant_dual both tilings, BF16 in", "dy 16384x7168", lambda: fp8.act_quant_dual(x), n * 4 + n // 16),
             ("  the two quantizers (before)", "dy 16384x7168", lambda: (fp8.act_quant(x), fp8.act_quant_t(x)),
              n * 4 + n // 16),
             ("weight_quant  128x128, FP32 in", "w 7168x18432", lambda: fp8.weight_quant(w), nw * 5),
             ("weight_quant  and W^T (w read once)", "w 7168x18432", lambda: fp8.weight_quant(w, transposed=True),
              nw * 6),
             ("torch's copy of W_fp8^T (before)", "w 7168x18432", lambda: w8.t().contiguous(), nw * 2))
    # the routed experts' SwiGLU and its quantizations, fused (fp8.swiglu_quant / swiglu_backward)
    # against the steps they replace (torch's elementwise ops eager, then the quantizer kernels; for
    # the backward that is its twin, fp8.swiglu_backward_ref); 8 experts
    M, I = 16384, 2048
    h = torch.randn(M, 2 * I, device=dev, dtype=bf16)
    h8, hs, _, _ = fp8.swiglu_quant(h)
    da = torch.randn(M, I, device=dev)
    offs = torch.arange(1, 9, device=dev, dtype=torch.int32) * (M // 8)
    tiles = fp8._group_tiles(offs, M)[0]
    n = M * I
    cases += (("swiglu_quant  h -> h_fp8, a_fp8", f"h {M}x{2 * I}", lambda: fp8.swiglu_quant(h), n * 7),
              ("  unfused (silu*mul, act_quant x2)", f"h {M}x{2 * I}",     # as the experts ran before, in BF16
               lambda: (fp8.act_quant(torch.nn.functional.silu(h[:, :I]) * h[:, I:]), fp8.act_quant(h)), n * 7),
              ("swiglu_backward da, h_fp8 -> dh, dh^T, a^T", f"da {M}x{I}",
               lambda: fp8.swiglu_backward(da, h8, hs, tiles), n * 11),
              ("  unfused (eager torch, act_quant(_t) x3)", f"da {M}x{I}",
               lambda: fp8.swiglu_backward_ref(da, h8, hs, tiles), n * 11))
    for name, shape, f, nbytes in cases:
        t = ms(f)
        print(f"{name:<44} ({shape}) {nbytes / t / 1e6:>6.0f} GB/s  {nbytes / t / 1e6 / copy_bw:>5.0%} of copy, "
              f"{t * 1e3:6.0f} us")
    print("   (the unfused rows count the fused kernel's bytes: their GB/s compare times, not traffic)")

    print("\n-- FP8Linear forward+backward, d=7168 -> 7168, 16384 tokens, BF16 activations (ms)")
    M, d = 16384, 7168
    x = torch.randn(M, d, device=dev, dtype=bf16, requires_grad=True)
    dy = torch.randn(M, d, device=dev, dtype=bf16)

    def fwd_bwd_once(layer, autocast):
        with torch.autocast(dev, bf16, enabled=autocast):
            y = layer(x)
        y.backward(dy)

    def fwd_bwd(layer, autocast):
        return ms(lambda: fwd_bwd_once(layer, autocast), grad_to_none=[x, layer.weight])

    for master in (bf16, torch.float32):
        autocast = master == torch.float32
        ref = nn.Linear(d, d, bias=False, device=dev, dtype=master)
        t_ref = fwd_bwd(ref, autocast)
        lin = fp8.FP8Linear(d, d, device=dev, dtype=master)
        row = f"weights {str(master)[6:]:<8}{' (autocast)' if autocast else '':<11} nn.Linear BF16 {t_ref:6.2f}"
        for impl in ("auto", "triton", "scaled_mm"):
            fp8.gemm_impl = impl
            try:
                t = fwd_bwd(lin, autocast)
                row += f" | FP8 {impl} {t:6.2f} ({t_ref / t:.2f}x)"
            except RuntimeError as e:
                row += f" | FP8 {impl} failed: {str(e).splitlines()[0][:60]}"
        fp8.gemm_impl = "auto"
        print(row)
        if profile_dir:
            _profile(lambda: fwd_bwd_once(lin, autocast), f"{profile_dir}/fp8linear_{str(master)[6:]}.txt")

    print("\n-- routed experts forward+backward: 8 experts x 2048 tokens (uneven), 7168 -> 2048 (ms)")
    E, K, N = 8, 7168, 2048
    sizes = torch.tensor([2048 + 256 * ((-1) ** e) * (e % 3) for e in range(E)])
    offs = sizes.cumsum(0).to(torch.int32).to(dev)
    x = torch.randn(int(sizes.sum()), K, device=dev, dtype=bf16, requires_grad=True)
    w = torch.randn(E, N, K, device=dev, dtype=bf16, requires_grad=True)
    dy = torch.randn(x.shape[0], N, device=dev, dtype=bf16)

    def run(f):
        def step():
            f(x, w, offs).backward(dy)
        return ms(step, grad_to_none=[x, w])
    row = ""
    try:
        row += f"BF16 torch._grouped_mm {run(lambda x, w, o: torch._grouped_mm(x, w.transpose(-2, -1), offs=o)):6.2f}"
    except (RuntimeError, AttributeError) as e:
        row += f"BF16 _grouped_mm failed: {str(e).splitlines()[0][:60]}"
    bounds = fp8._group_bounds(offs)
    t_loop = run(lambda x, w, o: torch.cat([x[s:t] @ w[e].t() for e, (s, t) in enumerate(bounds)]))
    row += f" | BF16 loop {t_loop:6.2f}"
    for impl in ("triton", "loop"):
        fp8.grouped_impl = impl
        row += f" | FP8 {impl} {run(fp8.fp8_grouped_linear):6.2f}"
        if profile_dir:
            _profile(lambda: fp8.fp8_grouped_linear(x, w, offs).backward(dy), f"{profile_dir}/experts_{impl}.txt")
    fp8.grouped_impl = "auto"
    print(row)
    _bench_grouped_kernels(ms, x.detach(), w.detach(), dy, offs)
    _bench_fp8_experts(ms, x, offs, E, K, N, profile_dir)


def _config(kernel, block_m=None):
    """The autotuner's choice for the key it tuned last (here: the shape just timed), e.g. 64x128 w4 s3
    (block_m: the kernel's fixed BLOCK_M, where the configs leave it out)."""
    cache = getattr(kernel, "cache", None)
    if not cache:
        return "?"
    cfg = list(cache.values())[-1]
    return f"{cfg.kwargs.get('BLOCK_M', block_m)}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"


def _bench_grouped_kernels(ms, x, w, dy, offs):
    """The grouped GEMMs alone on the same rows: BF16 torch._grouped_mm against the FP8 kernels,
    Fprop (rows grouped) and Wgrad (tokens grouped), operands already quantized."""
    import fp8
    (M, K), N = x.shape, w.shape[1]
    flop = 2 * M * N * K
    x8, xs = fp8.act_quant(x)
    w8, ws = fp8.weight_quant(w)
    rows = fp8.row_tiles(offs, M)
    tiles, kblocks = fp8._group_tiles(offs, M)
    dyT, dyTs = fp8.act_quant_t(dy, tiles=tiles)
    xT, xTs = fp8.act_quant_t(x, tiles=tiles)
    wT = w.transpose(-2, -1)
    t = {"BF16 Fprop": ms(lambda: torch._grouped_mm(x, wT, offs=offs)),
         "FP8 Fprop": ms(lambda: fp8.fp8_grouped_gemm_rows(x8, xs, w8, ws, offs, tiles=rows)),
         "FP8 Wgrad": ms(lambda: fp8.fp8_grouped_gemm_k(dyT, dyTs, xT, xTs, kblocks))}
    cfgs = {"FP8 Fprop": _config(fp8._fp8_gemm_rows_grouped_kernel, fp8.GROUPED_BLOCK_M),
            "FP8 Wgrad": _config(fp8._fp8_gemm_k_grouped_kernel)}
    print("   grouped GEMMs alone, TFLOP/s: " + " | ".join(
        f"{k} {flop / v / 1e9:.0f}" + (f" ({cfgs[k]})" if k in cfgs else "") for k, v in t.items()))


def _bench_fp8_experts(ms, x, offs, E, D, I, profile_dir=None):
    """The routed experts' whole SwiGLU, BF16 torch._grouped_mm against fp8.fp8_experts (x quantized
    once, w1 x and w3 x cached in FP8), eager and under torch.compile (the FP8 steps as custom ops;
    the first call's compile time is printed). Issue 11's target: FP8 1.3x faster than BF16."""
    import fp8
    import moe
    print(f"\n-- routed experts' SwiGLU w2(silu(w1 x) * w3 x), forward+backward, {E} experts, {x.shape[0]} rows, "
          f"{D} -> {I} -> {D} (ms)")
    w1, w3 = (torch.randn(E, I, D, device=x.device, dtype=x.dtype, requires_grad=True) for _ in range(2))
    w2 = torch.randn(E, D, I, device=x.device, dtype=x.dtype, requires_grad=True)
    dy = torch.randn_like(x)
    paths = {"BF16 grouped_mm": lambda x: moe.grouped_swiglu(x, w1, w2, w3, offs),   # as moe.Experts runs it
             "FP8 triton": lambda x: fp8.fp8_experts(x, w1, w2, w3, offs),
             "FP8 loop": lambda x: fp8.fp8_experts(x, w1, w2, w3, offs)}
    times = {}
    for name, f in paths.items():
        fp8.grouped_impl = "loop" if name == "FP8 loop" else "triton"
        for compiled in (False, True):
            run = torch.compile(f) if compiled else f
            step = lambda: run(x).backward(dy)  # noqa: E731
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            times[name, compiled] = ms(step, grad_to_none=[x, w1, w2, w3])
            print(f"{name:<16} {'compiled' if compiled else 'eager':<8} {times[name, compiled]:7.2f} ms "
                  f"(BF16 eager / this {times['BF16 grouped_mm', False] / times[name, compiled]:.2f}x; "
                  f"first call {first:.1f} s)")
            if profile_dir and compiled:
                _profile(step, f"{profile_dir}/swiglu_{name.replace(' ', '_')}.txt")
    fp8.grouped_impl = "auto"
    best = min(times[k] for k in times if k[0] != "BF16 grouped_mm")
    print(f"best FP8 / best BF16: {min(times['BF16 grouped_mm', c] for c in (False, True)) / best:.2f}x faster")


def _model_batch(preset, batch_size, seq_len, **overrides):
    import model
    args = model.preset(preset, max_seq_len=max(seq_len, model.PRESETS[preset].get("max_seq_len", 0)), **overrides)
    torch.manual_seed(0)
    m = model.Transformer(args).cuda()
    x = torch.randint(0, args.vocab_size, (batch_size, seq_len + 1), device="cuda")
    return m, x[:, :-1], x[:, 1:]


def bench_memory(preset="small", batch_size=4, seq_len=2048, compile=0):
    """Peak memory of one forward+backward, recompute off vs on (3.2.3), same weights and batch."""
    import triton.testing
    _header(f"memory: {preset}, batch {batch_size} x {seq_len}, bf16 autocast, {'compiled' if compile else 'eager'}")
    results, grads = {}, {}
    for recompute in (False, True):
        m, x, y = _model_batch(preset, batch_size, seq_len, recompute=recompute)
        run = torch.compile(m) if compile else m

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, losses = run(x, y)
            losses["loss"].backward()
        step()
        grads[recompute] = [p.grad.float().clone() for p in m.parameters()]
        m.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        m.zero_grad(set_to_none=True)
        ms = triton.testing.do_bench(step, warmup=2, rep=20)
        results[recompute] = (peak, ms)
        del m
        torch.cuda.empty_cache()
    rel = max(((a - b).norm() / a.norm().clamp_min(1e-12)).item() for a, b in zip(grads[False], grads[True]))
    print(f"{'recompute':>10} {'activation peak GB':>20} {'fwd+bwd ms':>12}")
    for r, (peak, ms) in results.items():
        print(f"{str(r):>10} {peak / 1e9:>20.2f} {ms:>12.1f}")
    print(f"saving: {1 - results[True][0] / results[False][0]:.1%} of the peak above the weights, "
          f"at {results[True][1] / results[False][1] - 1:+.1%} time; largest relative gradient difference {rel:.2e}")


def bench_step(preset="small", batch_size=16, seq_len=2048, fp8=0, compile=1, recompute=0, graphs=0, clip=0,
               route="auto", top=30):
    """A training step under the profiler: the CUDA kernels that take the time. Compiled, it also
    reports the first step's time (compilation and autotuning) and the graphs and graph breaks
    torch.compile made (an FP8 model should be one graph: fp8.py's steps are custom ops).
    graphs=1: torch.compile's mode="reduce-overhead", which replays the model's forward and
    backward as CUDA graphs (the BF16 step's shapes are static: the experts' row counts stay on
    the GPU), to see what the host's share of the step is. clip=1: with train.py's gradient clipping
    (the norm, and its factor applied inside AdamW's update), so that the step is train.py's step
    and what train.py logs beyond it is the loop's own cost. route: moe.route_impl, "auto" (the fused
    router kernel on a GPU), "torch" (three torch.topk calls per layer) or "triton" (the kernel).
    top: how many kernels the last table lists (by their total time)."""
    import comm
    import fp8 as fp8_module  # (fp8 is the flag)
    import model
    import moe
    import train
    moe.route_impl = route  # Gate.route refuses a value it does not know
    _header(f"step: {preset}, batch {batch_size} x {seq_len}, bf16 autocast{', fp8' if fp8 else ''}"
            f"{', recompute' if recompute else ''}, {'compiled' if compile else 'eager'}"
            f"{', CUDA graphs' if graphs and compile else ''}{', gradient clipping' if clip else ''}"
            f"{', torch.topk router' if route == 'torch' else ''}")
    m, x, y = _model_batch(preset, batch_size, seq_len, fp8=bool(fp8), recompute=bool(recompute))
    opt = train.AdamW([p for p in m.parameters()], lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                      compiled=bool(compile))
    cm = torch.compile(m, mode="reduce-overhead" if graphs else None) if compile else m

    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may be overwritten
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, losses = cm(x, y)
        losses["loss"].backward()
        opt.step(grad_scale=comm.clip_coefficient(comm.grad_norm(m), 1.0) if clip else None)
        opt.zero_grad(set_to_none=True)
    from torch._dynamo.utils import counters
    counters.clear()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    print(f"first step (compilation, autotuning): {time.perf_counter() - t0:.1f} s")
    if compile:
        breaks = counters["graph_break"]
        print(f"torch.compile: {counters['stats']['unique_graphs']} graph(s) (the model's, AdamW's update), "
              f"{sum(breaks.values())} graph break(s){': ' + '; '.join(list(breaks)[:3]) if breaks else ''}")
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        step()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / 5
    tokens = batch_size * seq_len
    flops = model.flops_per_token(m.args, seq_len) * tokens
    print(f"{ms:.1f} ms/step, {tokens / ms * 1e3:,.0f} tokens/s, {flops / ms / 1e9:.0f} TFLOP/s, "
          f"MFU {flops / ms * 1e3 / 989e12:.1%} (of 989 TFLOP/s dense BF16), "
          f"peak memory {torch.cuda.max_memory_allocated() / 1e9:.1f} GB")
    def clock():
        torch.cuda.synchronize()
        return time.perf_counter() * 1e3
    prof, wall = _profiled(step, clock)
    kernels = [(e.key, e.self_device_time_total / 1e3) for e in prof.key_averages() if e.self_device_time_total > 0]
    busy = sum(t for _, t in kernels)
    print(f"under the profiler: {wall:.1f} ms wall, {busy:.1f} ms in kernels (GPU busy {busy / wall:.0%})")
    by_kind = {}
    for name, t in kernels:
        kind = kernel_kind(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + t
    print("kernel time by kind: " + ", ".join(f"{k} {t:.1f} ms" for k, t in sorted(by_kind.items(), key=lambda kv: -kv[1])))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=90))
    # what the experts' GEMMs ran on: how uneven the routed rows were (this batch, summed over the
    # steps above; the bias is not updated here), and the configs the autotuner chose
    loads = [mod.load.float() for mod in m.modules() if isinstance(mod, moe.MoE)]
    if loads:
        top_share = [(load.max() / load.sum()).item() for load in loads]
        print(f"routed rows: the busiest expert has {min(top_share):.1%}-{max(top_share):.1%} of a layer's rows "
              f"(even: {1 / loads[0].numel():.1%})")
    for name in ("_fp8_gemm_rows_grouped_kernel", "_fp8_gemm_k_grouped_kernel", "_fp8_gemm_kernel"):
        kernel = getattr(fp8_module, name, None)
        for key, cfg in getattr(kernel, "cache", {}).items():
            print(f"autotuned {name} {key[:3]}: {cfg}")


# Kernel names by what they do (first match wins): the profile of a step, summed per kind. Inductor's
# kernels (triton_...) are named after the ops they fuse; the casts, norms, token permutations (the
# gathers and sums around the routed experts), SwiGLU and loss kinds split its share by those names
# (the README's earlier tables count all of them as "fused by torch.compile").
KERNEL_KINDS = [("AdamW", r"^triton_.*lerp.*sqrt"),
                ("casts (torch.compile)", r"^triton_poi_fused__(grouped_mm__)?to_copy(_t|_transpose|_view)*_\d+$"),
                ("RMSNorm (torch.compile)", r"^triton_.*rms_norm"),
                ("token permutation (torch.compile)", r"^triton_.*(index|gather|scatter)"),
                ("SwiGLU (torch.compile)", r"^triton_.*silu"),
                ("loss (torch.compile)", r"^triton_.*(log_softmax|nll_loss)"),
                ("other fused by torch.compile", r"^triton_"),
                ("SwiGLU with its FP8 quantization (fused)", r"^_swiglu"),
                ("FP8 quantization", r"quant"), ("grouped GEMM", r"grouped|ptr_array|GroupProblem"),
                ("attention", r"cudnn|fmha|flash|sdpa|attention"), ("GEMM", r"gemm|nvjet|cutlass|sm90_xmma|cublas|wgmma"),
                ("sort/top-k", r"sort|radix|topk"), ("index/scatter/gather", r"index|scatter|gather"),
                ("memcpy/memset", r"^memcpy|^memset"), ("elementwise (eager)", r"elementwise|copy|fill|reduce")]


def kernel_kind(name):
    """The KERNEL_KINDS kind of a CUDA kernel's name ("other" if none)."""
    return next((k for k, pattern in KERNEL_KINDS if re.search(pattern, name, re.I)), "other")


PIPELINES = (("dualpipe", False), ("dualpipe", True), ("1f1b", False))  # (schedule, overlapped F&B pairs)


def _pipeline_name(schedule, overlap):
    return schedule + " overlapped" * overlap


def bench_pipeline(preset="nano", batch_size=2, seq_len=64, chunks=0, steps=3, **overrides):
    """DualPipe against 1F1B (dualpipe.py). Under torchrun with PP processes (gloo on the CPU, NCCL on
    GPUs, gloo when ranks share a GPU): each stage's F, B, W and F&B chunk times; the step times of
    DualPipe with its pairs run as F then B and overlapped (figure 4), and of 1F1B, at the same micro-batch
    count (chunks, default 2 PP); each rank's idle time measured against simulate()'s from that run's
    median op times. On one process: one stage's F, B, W, an F&B pair run through the interleaved
    pieces against F then B, and simulate()'s bubbles at PP 4 and 8 from them. Other --key=value set
    ModelArgs fields (--n_layers=8)."""
    import os
    from contextlib import nullcontext

    import torch.distributed as dist

    import dualpipe
    import model
    try:   # --overlap is gone: both pair kinds always run
        args = model.preset(preset, max_seq_len=max(seq_len, model.PRESETS.get(preset, {}).get("max_seq_len", 0)),
                            **overrides)
    except ValueError as e:
        sys.exit(f"bench.py pipeline: {e}")
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return _bench_one_stage(args, batch_size, seq_len, chunks, cuda)
    world, local = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    # NCCL refuses two ranks on one GPU (GPU.md): gloo then, its point-to-point staged through the CPU
    dist.init_process_group("nccl" if cuda and world <= torch.cuda.device_count() else "gloo")
    C = chunks or 2 * world
    try:
        dualpipe.schedule(world, C), dualpipe.stage_layers(args, world)
    except ValueError as e:
        sys.exit(f"bench.py pipeline on {world} processes, --chunks={C}: {e}")
    g = torch.Generator().manual_seed(0)                 # the same batch on every rank
    tokens = torch.randint(0, args.vocab_size, (C * batch_size, seq_len + 1), generator=g)
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda else nullcontext()
    results = {}
    for schedule, overlap in PIPELINES:
        pipe = dualpipe.Pipeline(args, schedule, device=device, overlap=overlap)
        for i in range(steps + 1):                      # the first step warms up, untimed
            pipe.timed, pipe.times = i > 0, []
            with autocast:
                pipe.step(tokens[:, :-1], tokens[:, 1:], C)
            for p in pipe.parameters():
                p.grad = None
            for m in pipe.moe_layers():
                m.load.zero_()
            if i > 0:
                results.setdefault(_pipeline_name(schedule, overlap), []).append(_pipeline_times(pipe, C))
        del pipe
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        _header(f"pipeline: {preset}, PP={world} ({dist.get_backend()}, {device.type}), {C} micro-batches of "
                f"{batch_size} x {seq_len}, {steps} timed steps")
        _print_pipeline(gathered, world, C)
    dist.destroy_process_group()


def _pipeline_times(pipe, C):
    """One timed step of a Pipeline: its wall time, its compute time, and each op's time by (kind, stage);
    kind "Bi" is a zero-bubble B (input gradient only), "FB" an F&B pair (overlapped: one span; else its
    F and B run one after the other, summed)."""
    plan, deferred = pipe.plans[C]
    records = iter(pipe.times)
    ops, busy = {}, 0.0
    for step in (s for s, _, _ in plan if s):
        spans = [next(records)] if pipe.overlap and len(step) == 2 else [next(records) for _ in step]
        busy += sum(t1 - t0 for _, t0, t1 in spans)
        if len(step) == 2:
            ops.setdefault(("FB", pipe.stages[step[0][1]].index), []).append(sum(t1 - t0 for _, t0, t1 in spans))
        if len(spans) == len(step):
            for ((kind, d, c),), t0, t1 in spans:
                kind = "Bi" if kind == "B" and (d, c) in deferred else kind
                ops.setdefault((kind, pipe.stages[d].index), []).append(t1 - t0)
    (_, t0, t1), = records
    return dict(wall=t1 - t0, busy=busy, ops=ops)


def _print_pipeline(gathered, pp, C):
    import statistics

    import dualpipe
    med = statistics.median
    ms = lambda t: f"{t * 1e3:8.2f}" if t == t else f"{'-':>8}"  # noqa: E731
    names = [_pipeline_name(*p) for p in PIPELINES]

    def op(name, kind, stage=None):
        ts = [t for r in range(pp) for step in gathered[r][name] for (k, s), v in step["ops"].items()
              if k == kind and stage in (None, s) for t in v]
        return med(ts) if ts else float("nan")
    print("\n-- per-chunk op times by stage (ms, median; B: the whole backward, Bi: the zero-bubble B, input "
          "gradient only, W: its deferred weight gradient; F&B: a pair as F then B, and overlapped)")
    print(f"{'stage':>5} {'F':>8} {'B':>8} {'Bi':>8} {'W':>8} {'F&B':>8} {'F&B ovl':>8}")
    for s in range(pp):
        print(f"{s:>5} " + " ".join(ms(op(names[0], k, s)) for k in ("F", "B", "Bi", "W", "FB"))
              + " " + ms(op(names[1], "FB", s)))
    times = {}
    for name in names:       # each run's own medians; B - W: a whole backward costs what it measured
        F, B, W = op(name, "F"), op(name, "B"), op(name, "W")
        W = 0.0 if W != W else W
        times[name] = {"F": F, "B": B - W, "W": W, "F&B": op(name, "FB") if "overlapped" in name else F + B}
    t = times[names[1]]
    print(f"overlapped run, through the pieces: F {t['F'] * 1e3:.2f}, B {(t['B'] + t['W']) * 1e3:.2f}, "
          f"F&B {t['F&B'] * 1e3:.2f} (F + B: {(t['F'] + t['B'] + t['W']) * 1e3:.2f}); simulate() takes each run's "
          f"F, B - W, W and F&B (measured overlapped, else F + B), every stage alike")
    print("\n-- idle time per rank and step time (ms, median): measured, and simulated from the median times")
    sims = {name: dualpipe.simulate((dualpipe.schedule if name.startswith("dualpipe") else dualpipe.schedule_1f1b)(
        pp, C), times[name]) for name in names}
    print(f"{'':>6} | " + " | ".join(f"{name:^19}" for name in names))
    print(f"{'rank':>6} | " + " | ".join(f"{'measured':>9} {'simulated':>9}" for _ in names))
    idle = {k: [med(s["wall"] - s["busy"] for s in gathered[r][k]) for r in range(pp)] for k in names}
    walls = {k: med(med(s["wall"] for s in gathered[r][k]) for r in range(pp)) for k in names}
    rows = [(str(r), [idle[k][r] for k in names], [sims[k].idle[r] for k in names]) for r in range(pp)]
    rows += [("bubble", [max(idle[k]) for k in names], [sims[k].bubble for k in names]),
             ("step", [walls[k] for k in names], [sims[k].makespan for k in names])]
    for label, measured, simulated in rows:
        print(f"{label:>6} | " + " | ".join(f"{ms(a):>9} {ms(b):>9}" for a, b in zip(measured, simulated)))
    for a, b in ((names[0], names[2]), (names[1], names[2]), (names[1], names[0])):
        print(f"{a} / {b} step time: measured {walls[a] / walls[b]:.2f}, simulated "
              f"{sims[a].makespan / sims[b].makespan:.2f}")


def _bench_one_stage(args, batch_size, seq_len, chunks, cuda):
    """One stage (the second of four) on one process: F, B, the split B and W; through the pieces F, B, and
    an F&B pair overlapped (the F of one chunk interleaved with the B of another, W inside, in the
    profile's order) against F then B; and the bubbles simulate() predicts from these times."""
    import statistics

    import dualpipe
    device = torch.device("cuda" if cuda else "cpu")
    num_stages = min(4, args.n_layers)
    stage = dualpipe.Stage(args, min(1, num_stages - 1), num_stages).to(device)
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    h0 = torch.randn(batch_size, seq_len, args.dim, device=device)
    grad = torch.randn_like(h0)
    streams = dualpipe.Streams(device)

    def forward():
        h = h0.clone().requires_grad_()
        with autocast:
            out, parts = stage(h)
        roots = [(t, g) for t, g in ((out, grad), (parts["balance"], torch.ones_like(parts["balance"])))
                 if t.requires_grad]
        return h, [t for t, _ in roots], [g for _, g in roots]

    def forward_pieces():                           # the tape, its stepper, and the B it will need
        tape = dualpipe.Tape(streams)
        return tape, dualpipe.Forward(stage.pieces(tape, h0.clone().requires_grad_()))

    def seed(tape, fwd):
        out, parts = fwd.result
        tape.seed(out, grad)
        for b in parts["balances"]:
            tape.seed(b, torch.ones_like(b))

    def clock():
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()
    none = dualpipe.Forward(iter(()))
    _header(f"pipeline, one process: stage {stage.index} of {num_stages} ({len(stage.layers)} block(s)) of "
            f"{args.n_layers}-layer model, batch {batch_size} x {seq_len}, {device.type}")
    times = {k: [] for k in ("F", "B", "Bi", "W", "Fp", "Bp", "F&B")}

    def timed(key, fn, *a):                         # fn(*a), its time kept under key after the warm-up round
        t0 = clock()
        out = fn(*a)
        if warm:
            times[key].append(clock() - t0)
        return out
    for warm in (False,) + (True,) * 5:
        h, roots, grads = timed("F", forward)
        timed("B", torch.autograd.backward, roots, grads)
        stage.zero_grad(set_to_none=True)
        h, roots, grads = forward()
        _, W = timed("Bi", dualpipe.backward_input, roots, grads, [h])
        timed("W", W)
        with autocast:                              # through the pieces: F, then its B alone
            tape_a, fwd_a = forward_pieces()
            timed("Fp", dualpipe.overlapped, fwd_a, dualpipe.Backward(None, False))
            seed(tape_a, fwd_a)
            timed("Bp", dualpipe.overlapped, none, dualpipe.Backward(tape_a, False))
            tape_a, fwd_a = forward_pieces()        # an overlapped pair: F of b with B (and W) of a
            dualpipe.overlapped(fwd_a, dualpipe.Backward(None, False))
            seed(tape_a, fwd_a)
            _, fwd_b = forward_pieces()
            timed("F&B", dualpipe.overlapped, fwd_b, dualpipe.Backward(tape_a, True))
        stage.zero_grad(set_to_none=True)
    t = {k: statistics.median(v) for k, v in times.items()}
    print(f"F {t['F'] * 1e3:.2f} ms, B {t['B'] * 1e3:.2f} ms (whole backward), split: Bi {t['Bi'] * 1e3:.2f} "
          f"ms (input gradient) + W {t['W'] * 1e3:.2f} ms (weights)")
    print(f"through the pieces: F {t['Fp'] * 1e3:.2f} ms, B {t['Bp'] * 1e3:.2f} ms; an F&B pair overlapped "
          f"{t['F&B'] * 1e3:.2f} ms against F then B {(t['F'] + t['B']) * 1e3:.2f} ms "
          f"({t['F&B'] / (t['F'] + t['B']):.2f}x)")
    if cuda:  # how much of each the GPU spends in kernels: below 100%, the host is what it waits for
        def f_then_b():
            torch.autograd.backward(*forward()[1:])

        def pair():
            with autocast:
                tape_a, fwd_a = forward_pieces()
                dualpipe.overlapped(fwd_a, dualpipe.Backward(None, False))
                seed(tape_a, fwd_a)
                _, fwd_b = forward_pieces()
            return lambda: dualpipe.overlapped(fwd_b, dualpipe.Backward(tape_a, True))
        busy = [_busy(f_then_b, clock), _busy(pair(), clock, autocast)]
        stage.zero_grad(set_to_none=True)
        print(f"GPU busy (kernel time / wall time, under the profiler): F then B {busy[0]:.0%}, "
              f"the overlapped F&B pair {busy[1]:.0%}")
    measured = {"F": t["F"], "B": t["B"] - t["W"], "W": t["W"]}
    variants = {"dualpipe overlapped": {**measured, "F&B": t["F&B"]},
                "dualpipe F then B": {**measured, "F&B": t["F"] + t["B"]}}
    print("simulate() from these times (B - W for the input gradient, F&B as measured overlapped or F + B), "
          "stages all like this one:")
    print(f"{'PP':>3} {'chunks':>6} | " + " | ".join(f"{name + ' bubble':>26} {'makespan':>9}"
                                                     for name in (*variants, "1f1b")) + " (ms)")
    for pp in (4, 8):
        C = chunks or 2 * pp
        sims = [dualpipe.simulate(dualpipe.schedule(pp, C), v) for v in variants.values()]
        sims.append(dualpipe.simulate(dualpipe.schedule_1f1b(pp, C), variants["dualpipe F then B"]))
        print(f"{pp:>3} {C:>6} | " + " | ".join(f"{s.bubble * 1e3:>26.2f} {s.makespan * 1e3:>9.2f}" for s in sims))


def _profiled(fn, clock, context=None):
    """One call of fn under the CUDA profiler: (the profile, its wall time by clock())."""
    import contextlib

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof, context or contextlib.nullcontext():
        t0 = clock()
        fn()
        wall = clock() - t0
    return prof, wall


def _busy(fn, clock, context=None):
    """The sum of the CUDA kernels' times during one call of fn, over its wall time (clock in seconds)."""
    prof, wall = _profiled(fn, clock, context)
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e6 / wall


def bench_ep(tokens=4096, dim=7168, topk=8, experts=256, moe_inter=2048, limited=4, local_world=0, iters=10,
             channels="4,8,16,24,32"):
    """Expert-parallel dispatch and combine (comm.py), DeepSeek-V3's shapes by default. Under torchrun,
    all ranks one expert-parallel group (ep = world; NCCL on GPUs, gloo on the CPU or with several
    ranks on one GPU). local_world=L makes every L ranks a node (default: torchrun's), and tokens
    then reach at most `limited` nodes. On one process: what one GPU can tell, the permutations."""
    import os

    import torch.distributed as dist

    import comm
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return _bench_ep_local(tokens, dim, topk, experts, iters, cuda)
    world, local = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    # NCCL refuses two ranks on one GPU (GPU.md): gloo then, which takes CUDA tensors in all_to_all_single
    dist.init_process_group("nccl" if cuda and world <= torch.cuda.device_count() else "gloo")
    layout = comm.Layout(world, local_world or int(os.environ["LOCAL_WORLD_SIZE"]), ep=world, n_experts=experts)
    grid = comm.make_grid(layout, dist.get_rank())
    nodes, limited = layout.nodes_per_ep, min(limited, layout.nodes_per_ep)
    timer = lambda f: _ep_time(f, iters, cuda)  # noqa: E731
    say = print if grid.rank == 0 else (lambda *a, **k: None)
    if grid.rank == 0:
        _header(f"ep: {world} ranks ({dist.get_backend()}, {device.type}), {nodes} node(s) of {layout.ranks_per_node_ep}, "
                f"{tokens} tokens x {dim} per rank, top-{topk} of {experts} experts"
                + (f" within {limited} nodes" if nodes > 1 else "") + f", {iters} iterations")
    torch.manual_seed(grid.rank)
    idx = _ep_routing(tokens, experts, topk, nodes, limited, device)
    h = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16)
    g = torch.rand(tokens, topk, device=device)

    say("\n-- dispatch and combine per rank; GB/s = bytes sent to other GPUs / time; raw: all_to_all_single "
        "of the same bytes per peer, each hop")
    say(f"{'route':>12} {'dtype':>5} | {'dispatch ms':>11} {'GB/s':>6} {'raw ms':>7} {'GB/s':>6} | "
        f"{'combine ms':>10} {'GB/s':>6} {'raw ms':>7} {'GB/s':>6}")
    for hierarchical in (False, True) if nodes > 1 else (False,):
        for fp8_on in (False, True):
            d = comm.AllToAllDispatcher(grid, experts, hierarchical=hierarchical, fp8=fp8_on)
            t, t_raw, sent = _bench_ep_route(d, h, idx, g, timer, device)
            say(f"{'hierarchical' if hierarchical else 'flat':>12} {'FP8' if fp8_on else 'BF16':>5} | "
                + " | ".join(f"{t[i] * 1e3:>{11 - i}.2f} {sent[i] / t[i] / 1e9:>6.1f} {t_raw[i] * 1e3:>7.2f} "
                             f"{sent[i] / t_raw[i] / 1e9:>6.1f}" for i in (0, 1)))
    _bench_ep_overlap(grid, tokens, dim, topk, experts, moe_inter, limited, device, timer, say)
    _bench_ep_channels(grid, comm.FlatRoute(grid, idx, experts // world, comm.Traffic()).hop, dim, channels,
                       device, timer, say)
    dist.destroy_process_group()


def _bench_ep_route(d, h, idx, g, timer, device):
    """(dispatch, combine) seconds, the same for raw all-to-alls of the same bytes, and the bytes sent."""
    with torch.no_grad():
        d.traffic.reset()
        x, _, handle = d.dispatch(h, idx, g)
        y = x.to(torch.bfloat16)
        d.combine(y, handle)
        b = d.traffic.bytes
        t = [timer(lambda: d.dispatch(h, idx, g)), timer(lambda: d.combine(y, handle))]
    D, K = h.shape[1], idx.shape[1]
    x_bytes = D + D // 32 if d.fp8 else 2 * D  # a row towards the experts: FP8 with a scale per 128, or BF16
    r = handle.route
    hops = [(r.hop1, x_bytes + 8 * K), (r.hop2, x_bytes + 4)] if d.hierarchical else [(r.hop, x_bytes)]  # + idx, g
    back = [(hop, 2 * D) for hop, _ in hops]  # BF16 rows back
    t_raw = [timer(_raw_a2a(hops, False, device)), timer(_raw_a2a(back, True, device))]
    return t, t_raw, [b["dispatch_intra"] + b["dispatch_inter"], b["combine_intra"] + b["combine_inter"]]


def _ep_routing(tokens, experts, topk, nodes, limited, device):
    """Uniformly random top-k experts per token, among the experts of `limited` random nodes."""
    scores = torch.rand(tokens, experts, device=device)
    if nodes > 1:
        kept = torch.rand(tokens, nodes, device=device).topk(limited, -1).indices  # (N, M)
        allowed = torch.zeros(tokens, nodes, dtype=torch.bool, device=device).scatter_(1, kept, True)
        scores = scores.masked_fill(~allowed.repeat_interleave(experts // nodes, 1), -1.0)
    return scores.topk(topk, -1).indices  # (N, K)


def _ep_time(f, iters, cuda):
    """Seconds per call of f, the slowest rank's (in an all-to-all every rank waits for the slowest)."""
    import torch.distributed as dist
    f()
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        f()
    if cuda:
        torch.cuda.synchronize()
    t = torch.tensor([(time.perf_counter() - t0) / iters], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _raw_a2a(hops, reverse, device, group=None):
    """all_to_all_single of uint8 rows with each hop's split sizes (reverse: the way back), row_bytes
    per row: what the dispatcher's hops move, without its sorting, packing and count exchange."""
    import torch.distributed as dist
    calls = []
    for hop, row_bytes in hops:
        ins, outs = (hop.recv_splits, hop.send_splits) if reverse else (hop.send_splits, hop.recv_splits)
        src = torch.empty(sum(ins), row_bytes, dtype=torch.uint8, device=device)
        dst = torch.empty(sum(outs), row_bytes, dtype=torch.uint8, device=device)
        if group or hop.group is not None:
            calls.append((dst, src, outs, ins, group or hop.group))
    return lambda: [dist.all_to_all_single(*c[:4], group=c[4]) for c in calls]


def _bench_ep_overlap(grid, tokens, dim, topk, experts, moe_inter, limited, device, timer, say):
    """A MoE layer (one shared expert, BF16 autocast on the GPU) forward and forward+backward, with
    the routed rows in flight while the shared expert computes, and with the transfer waited for first."""
    from contextlib import nullcontext

    import comm
    import model
    import moe
    nodes = grid.layout.nodes_per_ep
    args = model.ModelArgs(dim=dim, inter_dim=moe_inter, moe_inter_dim=moe_inter, n_routed_experts=experts,
                           n_shared_experts=1, n_activated_experts=topk, n_expert_groups=nodes,
                           n_limited_groups=limited, route_scale=2.5)
    with torch.device("meta"):  # all E experts would not fit: shard first, then allocate this rank's
        layer = comm.shard_experts(moe.MoE(args), grid)
    layer.to_empty(device=device)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.02) if p.dim() >= 2 else p.fill_(1.0)
        layer.gate.bias.zero_()
        layer.load.zero_()
    x = torch.randn(1, tokens, dim, device=device, requires_grad=True)
    dy = torch.randn_like(x)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()

    def forward():
        with autocast:
            return layer(x)
    say(f"\n-- MoE layer: {experts // grid.layout.ep} experts of {moe_inter} per rank + 1 shared, "
        f"{'BF16 autocast' if device.type == 'cuda' else 'FP32'} (ms)")
    for overlap in (False, True):
        layer.dispatcher.overlap = overlap
        t_f = timer(forward)
        t_fb = timer(lambda: forward().backward(dy))
        say(f"{'shared experts during the transfer' if overlap else 'transfer, then shared experts':>36}: "
            f"forward {t_f * 1e3:8.2f}, forward+backward {t_fb * 1e3:8.2f}")


def _bench_ep_channels(grid, hop, dim, channels, device, timer, say):
    """The flat BF16 dispatch's all_to_all_single on a fresh communicator per channel cap: NCCL takes
    a cap per communicator (ProcessGroupNCCL.Options().config.min_ctas = max_ctas = N; NCCL's
    environment variables are read once per process, which is why comm.init sets them up front)."""
    import torch.distributed as dist
    nccl = dist.get_backend() == "nccl"
    values = [int(v) for v in str(channels).split(",") if v]
    cap = "capped at N CTAs (SMs)" if nccl else "gloo has no channels: uncapped"
    say(f"\n-- the flat BF16 dispatch's all_to_all_single on a fresh communicator per N, {cap}")
    sent = sum(n for n, link in zip(hop.send_splits, grid.links("ep")) if link != "self") * dim * 2
    for n in values:
        opts = None
        if nccl:
            opts = dist.ProcessGroupNCCL.Options()
            opts.config.min_ctas = opts.config.max_ctas = n
        group = dist.new_group(list(range(grid.layout.world)), pg_options=opts)
        t = timer(_raw_a2a([(hop, dim * 2)], False, device, group=group))
        say(f"N = {n:>3}: {t * 1e3:8.2f} ms, {sent / t / 1e9:7.1f} GB/s")


def _bench_ep_local(tokens, dim, topk, experts, iters, cuda):
    """One process: the dispatcher's gather / pack / sort (dispatch) and un-sort / sum (combine)
    without any communication, against the device copy bandwidth (bytes read + written)."""
    import comm
    device = torch.device("cuda" if cuda else "cpu")
    _header(f"ep, one process ({device.type}): the permutations alone, {tokens} tokens x {dim}, top-{topk} of {experts}")

    def ms(f):
        f()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            f()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / iters
    src = torch.randn(tokens * topk, dim, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_bw = 2 * src.nbytes / ms(lambda: dst.copy_(src))
    print(f"device copy: {copy_bw / 1e9:.0f} GB/s (read + write)")
    idx = torch.rand(tokens, experts, device=device).topk(topk, -1).indices
    h = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16)
    g = torch.rand(tokens, topk, device=device)
    for fp8_on in (False, True):
        d = comm.AllToAllDispatcher(comm.Grid.single(), experts, fp8=fp8_on)
        with torch.no_grad():
            x, _, handle = d.dispatch(h, idx, g)
            y = x.to(torch.bfloat16)
            t_d, t_c = ms(lambda: d.dispatch(h, idx, g)), ms(lambda: d.combine(y, handle))
        rows = tokens * topk  # each row written once and read once; towards the experts FP8 or BF16, back BF16
        moved = [2 * rows * (dim + dim // 32 if fp8_on else 2 * dim), 2 * rows * 2 * dim]
        print(f"{'FP8' if fp8_on else 'BF16':>4} dispatch {t_d * 1e3:7.2f} ms ({moved[0] / t_d / 1e9:5.0f} GB/s, "
              f"{moved[0] / t_d / copy_bw:4.0%} of copy) | combine {t_c * 1e3:7.2f} ms "
              f"({moved[1] / t_c / 1e9:5.0f} GB/s, {moved[1] / t_c / copy_bw:4.0%} of copy)")


def bench_decode(preset="nano", ckpt="", batch_sizes="1,32", prompt_len=32, new_tokens=64, temperature=0, hf=1,
                 rows=""):
    """Decoding tokens/s (model.py, 5.4.3): generate() (the latent cache read up to the position), the
    static cache of decode(), the same captured as CUDA graphs, and compiled then captured (GPU only),
    MTP speculative decoding in the same three ways, with its acceptance rate, and transformers' generate on the exported
    weights as the anchor (hf=0 skips it). ckpt: a train.py checkpoint (the EMA weights, as sample.py),
    else a freshly initialized preset, whose MTP module proposes at random (acceptance about 1/V).
    Prompts are random tokens, prompt_len each; every row decodes new_tokens (no end-of-text stop).
    Greedy by default, so every method should give the same tokens: the last column says how many rows
    get the tokens of the batch's first method.
    Times: the best of three runs after a warm-up; ms/token is per step of the batch. rows: only the
    methods whose names contain one of these comma-separated parts (e.g. rows="CUDA graph")."""
    import tempfile
    from types import SimpleNamespace

    import model as model_lib
    import sample
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if ckpt:
        m = sample.load_model(SimpleNamespace(ckpt=ckpt, tokenizer="", ema=True))[0]
    else:
        torch.manual_seed(0)
        m = model_lib.Transformer(model_lib.preset(preset, max_seq_len=max(prompt_len + new_tokens + 1, 64)))
    m = m.to(dev, dtype).eval()
    if prompt_len + new_tokens > m.args.max_seq_len:
        sys.exit(f"prompt_len + new_tokens = {prompt_len + new_tokens} exceed the model's max_seq_len={m.args.max_seq_len}")
    _header(f"decode: {ckpt or preset} ({m.args.n_layers} layers, d={m.args.dim}, vocab {m.args.vocab_size}), "
            f"prompts of {prompt_len}, {new_tokens} new tokens, temperature {temperature}, {dtype}")
    top = dict(temperature=float(temperature), top_k=None, top_p=None)
    methods = [("eager generate()", lambda idx, _: _generate(m, idx, new_tokens, top))]
    for spec in (False, True):                      # (name, cuda_graph, compile)
        for name, graph, comp in (("", False, False), (" + CUDA graph", True, False),
                                  (" + compiled + CUDA graph", True, True)):
            methods.append((("MTP speculative" if spec else "static cache") + name,
                            lambda idx, st, s=spec, g=graph, c=comp: _decode(m, idx, new_tokens, top, s, g, st, c)))
    if rows:
        methods = [(name, run) for name, run in methods if any(part in name for part in str(rows).split(","))]
    if hf and (not rows or any(part in "transformers generate()" for part in str(rows).split(","))):
        methods.append(("transformers generate()", _hf_generate(m, tempfile.mkdtemp(), new_tokens, top, dev, dtype)))
        if methods[-1][1] is None:
            methods.pop()
            print("(transformers is not installed, so no anchor row: pip install -r requirements-test.txt)")
    from torch._dynamo.utils import counters
    counters.clear()
    print(f"{'method':>40} {'batch':>5} | {'tokens/s':>9} {'ms/token':>9} | {'acceptance':>10} | same tokens as the first row")
    for B in (int(b) for b in str(batch_sizes).split(",")):
        idx = torch.randint(0, m.args.vocab_size, (B, prompt_len), device=dev)
        reference = None
        for name, run in methods:
            if "CUDA graph" in name and not cuda:
                print(f"{name:>40} {B:>5} | skipped: CUDA graphs need a GPU")
                continue
            if name.startswith("MTP") and not len(m.mtp):
                print(f"{name:>40} {B:>5} | skipped: the model has no MTP module")
                continue
            stats = {}
            run(idx, stats)  # warm-up: graph capture, allocator, lazy initializations
            times = []
            for _ in range(3):  # the best of three: a shared CPU's neighbours add noise
                _sync(cuda)
                t0 = time.perf_counter()
                tokens = run(idx, stats)
                _sync(cuda)
                times.append(time.perf_counter() - t0)
            dt = min(times)
            reference = tokens if reference is None else reference
            same = f"{sum(a == b for a, b in zip(tokens, reference))} of {B} rows" if top["temperature"] == 0 else "- (sampling)"
            rate = f"{stats['accepted'] / stats['proposed']:.1%}" if stats.get("proposed") else "-"
            print(f"{name:>40} {B:>5} | {B * new_tokens / dt:>9,.0f} {dt / new_tokens * 1e3:>9.2f} | {rate:>10} | {same}")
    if cuda:
        print(f"torch.compile (the compiled rows): {counters['stats']['unique_graphs']} graph(s), "
              f"{sum(counters['graph_break'].values())} graph break(s)")
    else:
        print("(no CUDA: the CUDA-graph rows are skipped; CPU timings say little about the GPU)")


def _sync(cuda):
    if cuda:
        torch.cuda.synchronize()


def _generate(m, idx, new_tokens, top):
    with torch.no_grad():
        return torch.stack(list(m.generate(idx, new_tokens, **top)), 1).tolist()


def _decode(m, idx, new_tokens, top, speculative, cuda_graph, stats, compile=False):
    import model as model_lib
    return model_lib.collect(model_lib.decode(m, idx, new_tokens, **top, speculative=speculative,
                                              cuda_graph=cuda_graph, stats=stats, compile=compile))


def _hf_generate(m, folder, new_tokens, top, dev, dtype):
    """transformers' DeepseekV3ForCausalLM on our exported weights, its generate() as a decoder."""
    try:
        import transformers
    except ImportError:
        return None
    m.save_pretrained(folder, dtype=dtype)
    transformers.logging.set_verbosity_error()  # its load report lists the MTP layer's tensors as unused
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(dev).eval()
    sampling = dict(do_sample=False) if top["temperature"] == 0 else dict(do_sample=True, temperature=top["temperature"], top_k=0)

    def run(idx, stats):
        with torch.no_grad():
            out = hf.generate(idx, max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                              pad_token_id=0, **sampling)
        return out[:, idx.shape[1]:].tolist()
    return run


SECTIONS = {"fp8": bench_fp8, "memory": bench_memory, "step": bench_step, "pipeline": bench_pipeline, "ep": bench_ep,
            "decode": bench_decode}
GPU_ONLY = {"memory", "step"}

if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what not in SECTIONS:
        sys.exit(f"usage: python bench.py <{'|'.join(SECTIONS)}> [--key=value ...]")
    kwargs = {}
    for a in sys.argv[2:]:
        key, _, value = a.removeprefix("--").partition("=")
        kwargs["profile_dir" if key == "profile" else key] = int(value) if value.isdigit() else value
    import moe
    if kwargs.get("route", "auto") not in moe.ROUTE_IMPLS:  # before the GPU check: a typo is named first
        sys.exit(f"bench.py {what}: --route={kwargs['route']}; choose one of {', '.join(moe.ROUTE_IMPLS)}")
    if "top" in kwargs and not (isinstance(kwargs["top"], int) and kwargs["top"] > 0):
        sys.exit(f"bench.py {what}: --top={kwargs['top']}; it is how many kernels the last table lists, a whole number from 1")
    if what in GPU_ONLY and not torch.cuda.is_available():
        sys.exit(f"bench.py {what} measures GPU memory and kernels: it needs CUDA, which this machine does not "
                 f"have (bench.py fp8 runs its emulation part on the CPU)")
    SECTIONS[what](**kwargs)
