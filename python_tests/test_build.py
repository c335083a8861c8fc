"""The build: every .cu compiles with plain nvcc, the CUDA bindings against torch's CUDA headers, a stale
extension is refused, the sdist carries every source."""

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import setuptools
import torch
from torch.utils.cpp_extension import include_paths

import fastnlp
from fastnlp._extension import check_build
from fastnlp._source_hash import csrc_hash
from markers import CUDA_INCLUDE, NVCC, requires_nvcc

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CUDA_SOURCES = sorted(CSRC.rglob("*.cu"))
CUDA_BINDINGS = sorted((CSRC / "cuda").glob("*_binding.cpp"))


def test_there_are_cuda_sources_to_check():
    assert CUDA_SOURCES, "every op has a CUDA kernel under csrc/cuda"


@requires_nvcc
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: str(p.relative_to(CSRC)))
def test_cuda_kernel_compiles_with_plain_nvcc(source, tmp_path):
    # No CUDA build of torch is needed: kernels take raw pointers and a stream.
    command = [NVCC, "-c", "-std=c++17", "-I", str(CSRC), "-Xcompiler", "-Wall", "-Werror", "all-warnings",
               "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
               str(source), "-o", str(tmp_path / "kernel.o")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_there_are_cuda_bindings_to_check():
    assert CUDA_BINDINGS, "every op's CUDA kernels have a torch binding under csrc/cuda"


@pytest.mark.parametrize("binding", CUDA_BINDINGS, ids=lambda p: str(p.relative_to(CSRC)))
def test_cuda_binding_compiles_against_torchs_cuda_headers(binding):
    # Only a CUDA build of torch links the bindings, and there is none on a
    # machine without a GPU; but torch's wheels ship c10's CUDA headers, which
    # with the CUDA toolkit's runtime headers are all the bindings include
    # (csrc/cuda/torch_cuda.h), so the real code (not the emulation's
    # stand-ins) is at least compiled here, with our warnings as errors.
    # C10_CUDA_NO_CMAKE_CONFIGURE_FILE: a CPU wheel lacks the generated
    # c10/cuda/impl/cuda_cmake_macros.h, which only matters on Windows.
    torch_include = [Path(path) for path in include_paths()]
    compiler = os.environ.get("CXX") or shutil.which("c++")
    if CUDA_INCLUDE is None or compiler is None:
        pytest.skip("needs the CUDA toolkit's headers and a C++ compiler")
    if not any((path / "c10" / "cuda" / "CUDAStream.h").is_file() for path in torch_include):
        pytest.skip(f"torch {torch.__version__} ships no c10/cuda headers")
    command = [compiler, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
               "-I", str(CSRC), *(arg for path in torch_include + [CUDA_INCLUDE] for arg in ("-isystem", str(path))),
               str(binding)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_matching_build_is_accepted():
    check_build(fastnlp._C.build_info(), torch.__version__, CSRC)


def test_stale_or_mismatched_build_is_refused_with_build_instructions(tmp_path):
    info = {"torch_version": torch.__version__, "source_hash": csrc_hash(CSRC)}
    with pytest.raises(ImportError, match="built against torch 0.0.1.*make build"):
        check_build({**info, "torch_version": "0.0.1"}, torch.__version__, CSRC)
    changed = tmp_path / "csrc"
    changed.mkdir()
    (changed / "ops.cpp").write_text("// edited\n")
    with pytest.raises(ImportError, match="stale.*make build"):
        check_build(info, torch.__version__, changed)
    # An installed package has no csrc/ beside it: only the torch version is checked.
    check_build(info, torch.__version__, None)


def test_sdist_carries_every_kernel_source(tmp_path):
    # setup.py compiles only what the building machine can use (no .cu without
    # nvcc), but an sdist made anywhere must build everywhere: headers and CUDA
    # sources included (the extension's depends in setup.py).
    command = [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist", "-d", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if tuple(int(part) for part in setuptools.__version__.split(".")[:2]) < (68, 1):
        # Too old to ship the depends: refused, rather than a broken sdist made.
        assert result.returncode != 0 and "needs setuptools >= 68.1" in result.stderr, result.stderr
        return
    assert result.returncode == 0, result.stdout + result.stderr
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as sdist:
        shipped = {Path(*Path(name).parts[1:]) for name in sdist.getnames()}
    sources = {path.relative_to(ROOT) for path in CSRC.rglob("*") if path.is_file()}
    assert sources - shipped == set()
