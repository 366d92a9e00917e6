import os
import sys

# Tests import the project's flat modules (model, moe, fp8, ...) from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """train.py's --data and --cache_dir for a small corpus: the first 60 KB of three plays."""
    import data
    root = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(data.corpus_text("shakespeare")[:3]):
        (root / f"play{i}.txt").write_text(text[:60_000])
    return [f"--data={root}/*.txt", f"--cache_dir={tmp_path_factory.mktemp('cache')}"]


@pytest.fixture
def sm90(tmp_path):
    """compile(kernel, pointer_dtypes, constexprs, num_warps, num_stages, maxnreg): a Triton kernel
    compiled for Hopper (sm_90) on this machine, no GPU needed (Triton ships ptxas). Arguments
    not named in either dict are int32; pointers, strides, N and K are taken as multiples of 16,
    as the launches specialize them. A type may name constexprs, e.g. a TMA descriptor's
    "tensordesc<fp8e4nv[{BLOCK_M}, {BLOCK_K}]>". Returns {"regs", "stack" (bytes of local memory a thread:
    spills), "shared", "ptx", "ptxas" (what ptxas -v says of that PTX)}. Skips without Triton, and
    under TRITON_INTERPRET=1, where kernels are not compiled."""
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter compiles nothing")
    import re
    import subprocess
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    def compile(kernel, pointers, constexprs, num_warps=4, num_stages=3, maxnreg=None):
        fn = kernel
        while not isinstance(fn, triton.runtime.JITFunction):       # the kernel under an autotuner
            fn = fn.fn
        names = fn.arg_names
        sig = {n: "constexpr" if n in constexprs else pointers.get(n, "i32").format(**constexprs) for n in names}
        divisible = [(i,) for i, n in enumerate(names) if sig[n][0] == "*" or n.startswith("stride") or n in ("N", "K")]
        attrs = {i: [["tt.divisibility", 16]] for i in divisible}
        cc = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg))
        # ptxas -v on the PTX (Triton's own ptxas, the same registers as its cubin): the registers, the
        # stack frame (spills), and advisories such as C7514/C7515 "wgmma.mma_async instructions are
        # serialized"
        ptx = tmp_path / "kernel.ptx"
        ptx.write_text(cc.asm["ptx"])
        ptxas = get_ptxas(90).path      # the ptxas Triton itself uses (TRITON_PTXAS_PATH, else its own)
        run = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(ptx), "-o", str(tmp_path / "kernel.cubin")],
                             capture_output=True, text=True)
        said = run.stdout + run.stderr
        assert run.returncode == 0 and "Used" in said, f"{ptxas} -v failed ({run.returncode}):\n{said}"
        regs = int(re.search(r"Used (\d+) registers", said).group(1))
        stack = int(re.search(r"(\d+) bytes stack frame", said).group(1))
        return dict(regs=regs, stack=stack, shared=cc.metadata.shared, ptx=cc.asm["ptx"], ptxas=said)
    return compile
