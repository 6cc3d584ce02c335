"""Build of nsa_cuda: the compiled extension nsa_cuda._C (CUDA kernels + CPU path + op registry).

Knobs (environment variables):
  NSA_CUDA_ARCHS     semicolon/comma list of GPU archs, default "80;90a" (sm_80 portable path,
                     sm_90a Hopper path with wgmma/TMA allowed)
  NSA_CUDA_DTYPES    subset of "bf16,fp16" to compile (default both)
  NSA_CUDA_HEADDIMS  subset of "64,128,192,256" to compile (default all)
  NSA_CUDA_FORCE_CPU=1  build the CPU-only extension even where a CUDA toolkit exists
  NSA_CUTLASS_INCLUDE   CUTLASS/CuTe include dir (default: from the nvidia-cutlass package)
  MAX_JOBS           parallel compile jobs (torch's ninja backend honours it)
  NSA_NVCC_THREADS   nvcc --threads per job (default 1)
Nothing is downloaded: no network, no submodules.
"""
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
ALL_DTYPES = ("bf16", "fp16")
ALL_HEADDIMS = ("64", "128", "192", "256")


def _split(value):
    return [v for v in re.split(r"[;, ]+", value.strip()) if v]


def _find_cuda_home():
    for key in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(key) and Path(os.environ[key], "bin", "nvcc").exists():
            return os.environ[key]
    for cand in ("/usr/local/cuda", "/usr/local/cuda-13.0"):
        if Path(cand, "bin", "nvcc").exists():
            return str(Path(cand).resolve())
    nvcc = shutil.which("nvcc")
    if nvcc:
        # /usr/local/bin/nvcc may be a wrapper script: its parent is not the toolkit root.
        root = Path(nvcc).resolve().parent.parent
        if (root / "include" / "cuda_runtime_api.h").exists():
            return str(root)
    return None


FORCE_CPU = os.environ.get("NSA_CUDA_FORCE_CPU", "0") not in ("", "0")
CUDA_HOME = None if FORCE_CPU else _find_cuda_home()
if CUDA_HOME:
    # Set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
    os.environ["CUDA_HOME"] = CUDA_HOME

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ARCHS = _split(os.environ.get("NSA_CUDA_ARCHS", "80;90a"))
DTYPES = _split(os.environ.get("NSA_CUDA_DTYPES", ",".join(ALL_DTYPES)))
HEADDIMS = _split(os.environ.get("NSA_CUDA_HEADDIMS", ",".join(ALL_HEADDIMS)))
for name, got, allowed in (("NSA_CUDA_DTYPES", DTYPES, ALL_DTYPES), ("NSA_CUDA_HEADDIMS", HEADDIMS, ALL_HEADDIMS)):
    bad = [v for v in got if v not in allowed]
    if bad or not got:
        sys.exit(f"setup.py: {name} must be a non-empty subset of {','.join(allowed)}, got {got}")
for arch in ARCHS:
    if not re.fullmatch(r"\d+a?", arch):
        sys.exit(f"setup.py: NSA_CUDA_ARCHS entries look like 80 or 90a, got {arch!r}")


def _cutlass_include():
    if os.environ.get("NSA_CUTLASS_INCLUDE"):
        return os.environ["NSA_CUTLASS_INCLUDE"]
    try:
        import cutlass_library  # from `pip install --no-deps nvidia-cutlass==4.2.0.0`

        inc = Path(cutlass_library.__file__).parent / "source" / "include"
        if (inc / "cute").is_dir():
            return str(inc)
    except ImportError:
        pass
    return None


def _instantiation_wanted(path: Path) -> bool:
    # Generated names: <family>_<dtype>.cu or <family>_<dtype>_hdim<D>.cu
    m = re.fullmatch(r".+_(bf16|fp16)(?:_hdim(\d+))?\.cu", path.name)
    if not m:
        return True
    return m.group(1) in DTYPES and (m.group(2) is None or m.group(2) in HEADDIMS)


def _rel(paths):
    return sorted(str(p.relative_to(ROOT)) for p in paths)


cpu_sources = _rel(list((ROOT / "csrc" / "kernels" / "cpu").glob("*.cpp")) + list((ROOT / "csrc" / "torch").glob("*.cpp")))
build_macros = [
    ("NSA_BUILD_DTYPES", "_".join(DTYPES)),
    ("NSA_BUILD_HEADDIMS", "_".join(HEADDIMS)),
]
include_dirs = [str(ROOT / "csrc")]
cxx_flags = ["-O3", "-std=c++20", "-DNDEBUG"]

if CUDA_HOME:
    cutlass = _cutlass_include()
    if cutlass:
        include_dirs.append(cutlass)
    else:
        print("setup.py: note: CUTLASS/CuTe headers not found (pip install --no-deps nvidia-cutlass==4.2.0.0 "
              "or set NSA_CUTLASS_INCLUDE); kernels that need them will not compile", file=sys.stderr)
    cuda_sources = _rel(list((ROOT / "csrc" / "kernels").glob("*.cu"))
                        + [p for p in (ROOT / "csrc" / "instantiations").glob("*.cu") if _instantiation_wanted(p)])
    enable = [f"-DNSA_ENABLE_{d.upper()}" for d in DTYPES] + [f"-DNSA_ENABLE_HDIM{d}" for d in HEADDIMS]
    macros = build_macros + [("NSA_WITH_CUDA", None), ("NSA_BUILD_ARCHS", "_".join(ARCHS))]
    gencode = []
    for arch in ARCHS:
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    nvcc_flags = gencode + [
        "-O3", "--use_fast_math", "-std=c++20", "--expt-relaxed-constexpr", "-DNDEBUG", "-lineinfo",
        "-Xptxas=-warn-spills", "-diag-suppress=3189", f"--threads={os.environ.get('NSA_NVCC_THREADS', '1')}",
        # torch's defaults would disable the half operators the kernels use
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ] + enable
    ext = CUDAExtension(
        name="nsa_cuda._C",
        sources=cpu_sources + cuda_sources,
        include_dirs=include_dirs,
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags + enable, "nvcc": nvcc_flags},
    )
    print(f"setup.py: CUDA build ({CUDA_HOME}); archs={ARCHS} dtypes={DTYPES} head_dims={HEADDIMS}; "
          f"{len(cuda_sources)} CUDA sources", file=sys.stderr)
else:
    why = "NSA_CUDA_FORCE_CPU is set" if FORCE_CPU else "no CUDA toolkit (nvcc) was found"
    print(f"setup.py: building the CPU-only extension because {why}: every op runs on CPU tensors; "
          "CUDA tensors raise a clear error. Set CUDA_HOME to build the CUDA kernels.", file=sys.stderr)
    ext = CppExtension(
        name="nsa_cuda._C",
        sources=cpu_sources,
        include_dirs=include_dirs,
        define_macros=build_macros + [("NSA_BUILD_ARCHS", "none")],
        extra_compile_args={"cxx": cxx_flags},
    )

setup(
    name="nsa_cuda",
    version="0.1.0",
    description="Native Sparse Attention (NSA) as CUDA kernels for PyTorch",
    packages=["nsa_cuda"],
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    zip_safe=False,
)
