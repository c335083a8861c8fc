"""Build the fastnlp._C extension.

CPU kernels are always compiled. CUDA kernels are compiled when the installed
torch was built with CUDA and nvcc is found -- a GPU does not need to be
visible, so a GPU-less build host can still produce CUDA kernels.

Environment:
  FASTNLP_CPU_ONLY=1       never compile the CUDA kernels
  MAX_JOBS=N               parallel compile jobs (read by torch's ninja build)
  TORCH_CUDA_ARCH_LIST     CUDA archs, default "8.0;9.0"
"""

import glob
import importlib.util
import os
import shutil
import subprocess
import sys

import setuptools
import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
GENERATED = os.path.join(ROOT, "build", "generated")


def source_files(pattern):
    return sorted(glob.glob(os.path.join("csrc", pattern), recursive=True))


def load_source_hash():
    """fastnlp/_source_hash.py, loaded by path: fastnlp itself is not importable before it is built."""
    spec = importlib.util.spec_from_file_location("_source_hash", os.path.join(ROOT, "fastnlp", "_source_hash.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.csrc_hash


def want_cuda():
    if os.environ.get("FASTNLP_CPU_ONLY", "0") not in ("", "0"):
        return False
    nvcc_found = shutil.which("nvcc") is not None or CUDA_HOME is not None
    return torch.version.cuda is not None and nvcc_found


# torch's CUDA headers, which the bindings include, include these: a toolkit
# without them (an nvcc-only install, say) fails deep inside the compile.
CUDA_HEADERS_TORCH_NEEDS = ("cuda_runtime_api.h", "cusparse.h", "cublas_v2.h", "cublasLt.h", "cusolverDn.h")
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def check_cuda_headers():
    """Stops with what to do when the compiler cannot find a header the CUDA
    build needs. The compiler itself is asked (it preprocesses the includes
    with the toolkit's include folder, as the build will), so its own search
    folders, CPATH and the like count; only commands that compile check."""
    if not BUILD_COMMANDS.intersection(sys.argv[1:]):
        return
    include_dirs = [os.path.join(CUDA_HOME, "include")] if CUDA_HOME else []
    if os.environ.get("CUDA_INC_PATH"):
        include_dirs.append(os.environ["CUDA_INC_PATH"])
    source = "".join(f"#include <{header}>\n" for header in CUDA_HEADERS_TORCH_NEEDS)
    command = [os.environ.get("CXX", "c++"), "-E", "-x", "c++", "-", "-o", os.devnull]
    command += [f"-I{d}" for d in include_dirs]
    try:
        result = subprocess.run(command, input=source, capture_output=True, text=True)
    except OSError:  # no compiler by that name: the build will say so itself
        return
    if result.returncode != 0:
        first_error = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip())
        sys.exit(f"fastnlp: torch {torch.__version__} has CUDA and nvcc was found, so the CUDA kernels are built, "
                 f"but the compiler cannot find the CUDA headers torch's include ({first_error}; looked in "
                 f"{', '.join(include_dirs) or 'no CUDA_HOME'} and its own folders). Set CUDA_HOME to the CUDA "
                 "toolkit (and CPATH to headers installed elsewhere, e.g. pip's nvidia/cu13/include), or "
                 "FASTNLP_CPU_ONLY=1 to build without the CUDA kernels.")


def write_build_stamp():
    """Only ops.cpp includes this header, so a source change recompiles one file, not all."""
    os.makedirs(GENERATED, exist_ok=True)
    text = (
        "#pragma once\n"
        f'#define FASTNLP_SOURCE_HASH "{load_source_hash()(os.path.join(ROOT, "csrc"))}"\n'
        f'#define FASTNLP_TORCH_VERSION "{torch.__version__}"\n'
    )
    path = os.path.join(GENERATED, "fastnlp_build_stamp.h")
    old = open(path).read() if os.path.exists(path) else None
    if old != text:
        with open(path, "w") as f:
            f.write(text)


def extension():
    with_cuda = want_cuda()
    write_build_stamp()
    sources = source_files("*.cpp") + source_files("cpu/*.cpp")
    # -fno-trapping-math lets the compiler if-convert (and so vectorise) the
    # branchy exp/log loops in csrc/cpu/vector_loops.h; nothing reads FP traps.
    cxx_flags = ["-O3", "-fno-trapping-math"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is OpenMP code in torch's headers: without -fopenmp
        # it compiles to a serial loop. libgomp.so.1 resolves to the copy torch
        # already loaded (same soname), so there is one OpenMP runtime.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    define_macros = []
    extra = {"cxx": cxx_flags}
    if with_cuda:
        check_cuda_headers()
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += source_files("cuda/*.cu") + source_files("cuda/*.cpp")
        define_macros.append(("FASTNLP_WITH_CUDA", "1"))
        extra["nvcc"] = ["-O3", "-std=c++17", "-lineinfo"]
        ext_class = CUDAExtension
    else:
        ext_class = CppExtension
    # Every other file under csrc (headers; CUDA sources on a CPU-only build):
    # setuptools puts an extension's depends into the sdist, which must build
    # on any machine, whatever this one compiles.
    depends = [path for path in source_files("**/*") if os.path.isfile(path) and path not in sources]
    return ext_class(
        name="fastnlp._C",
        sources=sources,
        depends=depends,
        include_dirs=[os.path.join(ROOT, "csrc"), GENERATED],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=link_flags,
    )


def check_sdist_carries_depends():
    """setuptools puts an extension's depends (every header) into the sdist
    from 68.1 on; an older one makes an sdist that cannot build."""
    if "sdist" not in sys.argv:
        return
    if tuple(int(part) for part in setuptools.__version__.split(".")[:2]) < (68, 1):
        sys.exit(f"fastnlp: making an sdist needs setuptools >= 68.1 (found {setuptools.__version__}): "
                 "older ones leave out the headers under csrc/")


check_sdist_carries_depends()
setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
