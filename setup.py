"""Build the two extension modules with one CMake project (docs/architecture.md).

``eplb._C`` (CPU C++, always built) and ``lplb._C`` (CUDA kernels when ``nvcc`` is found; set
``LPLB_CUDA=0`` to skip them or ``LPLB_CUDA=1`` to require them). Neither links libtorch, so one
build serves any torch.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

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
    return nvcc


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures the CMake project once and builds one target per extension."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        # LPLB_BUILD_DIR lets parallel builds of one checkout keep separate CMake trees.
        build_dir = Path(os.environ.get("LPLB_BUILD_DIR") or self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        if not getattr(self, "_configured", False):
            nvcc = _want_cuda()
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
            ]
            if nvcc:
                cfg.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
            if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
                cfg.append("-GNinja")
            subprocess.check_call(["cmake", *cfg])
            self._configured = True
        target = ext.name.split(".")[0] + "_C"  # eplb._C -> eplb_C (CMakeLists.txt)
        jobs = str(max(1, os.cpu_count() or 1))
        subprocess.check_call(
            ["cmake", "--build", str(build_dir), "--target", target, "--parallel", jobs]
        )


setup(
    ext_modules=[CMakeExtension("eplb._C"), CMakeExtension("lplb._C")],
    cmdclass={"build_ext": CMakeBuild},
)
