"""
Benchmarks, one section per part of the system: `python bench.py <what>`.

    python bench.py fp8 [--profile=DIR]
                            fine-grained FP8 (fp8.py): GEMMs against BF16 and cuBLAS's blockwise
                            FP8, quantization bandwidth against a device copy, FP8Linear and the
                            grouped expert GEMMs forward+backward against BF16, and the promotion
                            emulation of 3.3.2 (that last part also runs on the CPU)

    python bench.py memory [--preset=small --batch_size=4 --seq_len=2048]
                            activation recomputation (3.2.3): peak GPU memory and step time of
                            forward+backward with recompute off and on, and whether the gradients agree
    python bench.py step [--preset=small --batch_size=16 --seq_len=2048 --fp8=0 --compile=1]
                            one training step (forward, backward, optimizer), BF16 or with FP8
                            GEMMs, compiled (model and AdamW) or eager: its time and MFU, then where the time goes,
                            by CUDA kernel, under the profiler

Timings are medians of triton.testing.do_bench (CUDA events, L2 flushed between runs), except
`step`, which averages 5 steps between two CUDA events.
"""

import datetime
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
    w = torch.randn(7168, 7168, device=dev)
    n = x.numel()
    cases = (("act_quant     1x128, BF16 in", lambda: fp8.act_quant(x), n * 3 + n // 32),
             ("act_quant_t   128x1, BF16 in", lambda: fp8.act_quant_t(x), n * 3 + n // 32),
             ("act_quant_t   128x1, FP8 cache in", lambda: fp8.act_quant_t(x8, xs), n * 2 + n // 16),
             ("weight_quant  128x128, FP32 in", lambda: fp8.weight_quant(w), w.numel() * 5))
    for name, f, nbytes in cases:
        gbs = nbytes / ms(f) / 1e6
        print(f"{name:<34} (16384x7168) {gbs:>6.0f} GB/s  {gbs / copy_bw:>5.0%} of copy")

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


def bench_step(preset="small", batch_size=16, seq_len=2048, fp8=0, compile=1):
    """A training step under the profiler: the CUDA kernels that take the time."""
    import model
    import train
    from torch.profiler import ProfilerActivity, profile
    _header(f"step: {preset}, batch {batch_size} x {seq_len}, bf16 autocast{', fp8' if fp8 else ''}, "
            f"{'compiled' if compile else 'eager'}")
    m, x, y = _model_batch(preset, batch_size, seq_len, fp8=bool(fp8))
    opt = train.AdamW([p for p in m.parameters()], lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                      compiled=bool(compile))
    cm = torch.compile(m) if compile else m

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, losses = cm(x, y)
        losses["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    print(f"first step (compilation, autotuning): {time.perf_counter() - t0:.1f} s")
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
          f"MFU {flops / ms * 1e3 / 989e12:.1%} (of 989 TFLOP/s dense BF16)")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


SECTIONS = {"fp8": bench_fp8, "memory": bench_memory, "step": bench_step}
GPU_ONLY = {"memory", "step"}

if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what not in SECTIONS:
        sys.exit(f"usage: python bench.py <{'|'.join(SECTIONS)}> [--key=value ...]")
    kwargs = {}
    for a in sys.argv[2:]:
        key, _, value = a.removeprefix("--").partition("=")
        kwargs["profile_dir" if key == "profile" else key] = int(value) if value.isdigit() else value
    if what in GPU_ONLY and not torch.cuda.is_available():
        sys.exit(f"bench.py {what} measures GPU memory and kernels: it needs CUDA, which this machine does not "
                 f"have (bench.py fp8 runs its emulation part on the CPU)")
    SECTIONS[what](**kwargs)
