"""Build the extension modules with one CMake project (docs/architecture.md).

``eplb._C`` (CPU C++, always built; with the CUDA kernels also the row copies of expert moves)
and ``lplb._C`` (the CUDA kernels when ``nvcc`` is found and the machine has an NVIDIA driver;
``LPLB_CUDA=1`` requires them, e.g. on a build node without GPUs or in CI, ``LPLB_CUDA=0`` skips
them). Neither links libtorch, so one build serves any torch.

``lplb._nvshmem`` (the NVSHMEM workload exchange, docs/exchange.md) is built with the CUDA
kernels when NVSHMEM is found: ``NVSHMEM_HOME``, else the ``nvidia-nvshmem-cu13`` wheel
(``nvidia/nvshmem`` on ``sys.path``). ``LPLB_NVSHMEM=auto`` (default) builds it if found and
only warns if that build fails, ``LPLB_NVSHMEM=1`` requires it, ``LPLB_NVSHMEM=0`` skips it.
"""

import ctypes.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = Path(__file__).resolve().parent


def _find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(cuda_home) / "bin" / "nvcc"
    if candidate.is_file():
        return str(candidate)
    return shutil.which("nvcc")


def _want_cuda() -> str | None:
    flag = os.environ.get("LPLB_CUDA", "auto").strip().lower()
    if flag not in ("auto", "0", "1"):
        raise ValueError(f"LPLB_CUDA must be 0, 1 or auto, got {flag!r}")
    if flag == "0":
        return None
    nvcc = _find_nvcc()
    if nvcc is None and flag == "1":
        raise RuntimeError("LPLB_CUDA=1 but nvcc was not found (set CUDA_HOME)")
    if flag == "auto" and not _has_nvidia_driver():
        # Compiling the kernels takes minutes on a small machine and nothing here could run
        # them; LPLB_CUDA=1 builds them anyway.
        print(
            "lplb: no NVIDIA driver found, building without the CUDA kernels (LPLB_CUDA=1 to force)"
        )
        return None
    return nvcc


def _has_nvidia_driver() -> bool:
    """An NVIDIA driver on this machine: its device node, its tool, or its library."""
    return (
        Path("/dev/nvidiactl").exists()
        or shutil.which("nvidia-smi") is not None
        or ctypes.util.find_library("cuda") is not None
    )


def _nvshmem_mode() -> str:
    flag = os.environ.get("LPLB_NVSHMEM", "auto").strip().lower()
    if flag not in ("auto", "0", "1"):
        raise ValueError(f"LPLB_NVSHMEM must be 0, 1 or auto, got {flag!r}")
    return flag


def _find_nvshmem() -> Path | None:
    """NVSHMEM's root (include/nvshmem.h, lib/libnvshmem_device.a): NVSHMEM_HOME, else the
    nvidia-nvshmem-cu13 wheel's ``nvidia/nvshmem`` folder on sys.path."""
    home = os.environ.get("NVSHMEM_HOME")
    candidates = [Path(home)] if home else [Path(p or ".") / "nvidia" / "nvshmem" for p in sys.path]
    for root in candidates:
        if (root / "include" / "nvshmem.h").is_file() and (
            root / "lib" / "libnvshmem_device.a"
        ).is_file():
            return root.resolve()
    return None


def _want_nvshmem(nvcc: str | None) -> Path | None:
    """Where to build lplb._nvshmem from, or None to skip it."""
    mode = _nvshmem_mode()
    if mode == "0":
        return None
    root = _find_nvshmem()
    if mode == "1" and nvcc is None:
        raise RuntimeError("LPLB_NVSHMEM=1 needs the CUDA build (nvcc not found, or LPLB_CUDA=0)")
    if mode == "1" and root is None:
        raise RuntimeError(
            "LPLB_NVSHMEM=1 but NVSHMEM was not found: pip install nvidia-nvshmem-cu13, or set "
            "NVSHMEM_HOME to a root holding include/nvshmem.h and lib/libnvshmem_device.a"
        )
    return root if nvcc else None


# CMake target of each extension module (CMakeLists.txt).
TARGETS = {"eplb._C": "eplb_C", "lplb._C": "lplb_C", "lplb._nvshmem": "lplb_nvshmem"}


class CMakeExtension(Extension):
    def __init__(self, name: str, optional: bool = False) -> None:
        super().__init__(name, sources=[], optional=optional)


class CMakeBuild(build_ext):
    """Configures the CMake project once and builds one target per extension."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        # LPLB_BUILD_DIR lets parallel builds of one checkout keep separate CMake trees.
        build_dir = Path(os.environ.get("LPLB_BUILD_DIR") or self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        if not getattr(self, "_configured", False):
            nvcc = _want_cuda()
            nvshmem = _want_nvshmem(nvcc)
            out = {
                e.name: Path(self.get_ext_fullpath(e.name)).resolve().parent
                for e in self.extensions
            }
            cfg = [
                f"-S{ROOT}",
                f"-B{build_dir}",
                f"-DEPLB_OUTPUT_DIR={out['eplb._C']}",
                f"-DLPLB_OUTPUT_DIR={out['lplb._C']}",
                f"-DPython_EXECUTABLE={sys.executable}",
                f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                "-DCMAKE_BUILD_TYPE=Release",
                f"-DLPLB_WITH_CUDA={'ON' if nvcc else 'OFF'}",
                # auto stays AUTO for CMake too: not finding NVSHMEM there is no error.
                f"-DLPLB_NVSHMEM={'OFF' if not nvshmem else _nvshmem_mode().upper()}",
            ]
            if nvshmem:
                cfg.append(f"-DNVSHMEM_HOME={nvshmem}")
            if nvcc:
                cfg.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
            if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
                cfg.append("-GNinja")
            subprocess.check_call(["cmake", *cfg])
            self._configured = True
        jobs = str(max(1, os.cpu_count() or 1))
        command = ["cmake", "--build", str(build_dir), "--target", TARGETS[ext.name]]
        try:
            subprocess.check_call([*command, "--parallel", jobs])
        except subprocess.CalledProcessError as err:
            if not ext.optional:
                raise
            # CompileError makes setuptools warn and go on without an optional extension.
            raise CompileError(
                f"{ext.name} failed to build ({err}); continuing without it"
            ) from err


def _extensions() -> list[Extension]:
    modules = [CMakeExtension("eplb._C"), CMakeExtension("lplb._C")]
    if _want_nvshmem(_want_cuda()) is not None:  # raises for LPLB_NVSHMEM=1 without NVSHMEM
        # auto: a failing NVSHMEM build leaves lplb without the NVSHMEM exchange, not unbuilt.
        modules.append(CMakeExtension("lplb._nvshmem", optional=_nvshmem_mode() == "auto"))
    return modules


setup(ext_modules=_extensions(), cmdclass={"build_ext": CMakeBuild})
