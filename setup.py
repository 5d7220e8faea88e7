"""Build of maqd_kernels: the pure-Python package, plus maqd_kernels._C compiled from csrc/.

_C is built with nvcc through ninja. It depends on the CUDA runtime (linked statically) and
pybind11 only, never on PyTorch's C++ headers, so it does not care which torch is installed and
builds on a machine with a CPU-only torch. Environment:

    MAQD_CUDA_ARCHS       SM architectures, ';' or ',' separated (default "80;90a"); PTX is
                          embedded for the newest portable one, so newer GPUs can JIT it
    MAQD_SKIP_CUDA_BUILD  "1" installs the pure-Python package only
    MAQD_NVCC             the nvcc to use (default: the one on PATH)
    MAX_JOBS              parallel compile jobs (default: CPU count)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "80;90a"


def parse_archs(spec: str) -> list[str]:
    """'80;90a' or '8.0, 9.0a' or 'sm_80' -> ['80', '90a']."""
    archs = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        arch = item.lower().removeprefix("sm_").removeprefix("compute_").replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", arch):
            raise ValueError(f"MAQD_CUDA_ARCHS: cannot read architecture {item!r} (expected e.g. 80 or 90a)")
        archs.append(arch)
    if not archs:
        raise ValueError("MAQD_CUDA_ARCHS is empty")
    return archs


def ptx_arch(archs: list[str]) -> str:
    """The newest architecture whose PTX every later GPU can JIT (arch-specific 'a'/'f' PTX cannot)."""
    portable = [a for a in archs if a.isdigit()]
    return max(portable or [re.sub(r"\D", "", a) for a in archs], key=int)


def gencode_flags(archs: list[str]) -> list[str]:
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    ptx = ptx_arch(archs)
    flags.append(f"-gencode=arch=compute_{ptx},code=compute_{ptx}")
    return flags


def find_nvcc() -> str | None:
    return os.environ.get("MAQD_NVCC") or shutil.which("nvcc")


def find_ninja() -> str:
    try:
        import ninja

        return str(Path(ninja.BIN_DIR) / "ninja")
    except ImportError:
        found = shutil.which("ninja")
        if found is None:
            raise RuntimeError("building maqd_kernels._C needs ninja: pip install ninja") from None
        return found


def quote(arg: str) -> str:
    """Escapes one argument for a ninja command line (run by /bin/sh)."""
    return "'" + arg.replace("'", "'\\''") + "'" if re.search(r"[^\w@%+=:,./-]", arg) else arg


class NinjaNvccBuild(build_ext):
    """Compiles each csrc/*.cu and csrc/bindings.cpp with nvcc and links them with a static cudart."""

    def build_extension(self, ext: Extension) -> None:
        nvcc = find_nvcc()
        archs = parse_archs(os.environ.get("MAQD_CUDA_ARCHS", DEFAULT_ARCHS))
        build_dir = Path(self.build_temp).resolve() / "maqd_C"
        build_dir.mkdir(parents=True, exist_ok=True)
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        output.parent.mkdir(parents=True, exist_ok=True)

        (build_dir / "build_info.h").write_text(
            f'#pragma once\n#define MAQD_CUDA_ARCHS "{";".join(archs)}"\n#define MAQD_PTX_ARCH "{ptx_arch(archs)}"\n'
        )
        import pybind11

        common = [
            "-std=c++17",
            "-O3",
            "-Xcompiler",
            "-fPIC",
            "-Xcompiler",
            "-ffp-contract=off",
            f"-I{CSRC}",
            f"-I{build_dir}",
        ]
        cuda_flags = common + ["-lineinfo", "--expt-relaxed-constexpr"] + gencode_flags(archs)
        cxx_flags = common + [
            f"-I{pybind11.get_include()}",
            f"-I{sysconfig.get_paths()['include']}",
            "-Xcompiler",
            "-fvisibility=hidden",
        ]
        # Static cudart keeps `import maqd_kernels._C` free of CUDA libraries on the loader path;
        # its symbols stay private so they cannot clash with the cudart that torch loads.
        link_flags = ["-shared", "--cudart=static", "-Xlinker", "--exclude-libs=ALL"]

        sources = sorted(CSRC.glob("*.cu")) + [CSRC / "bindings.cpp"]
        lines = [
            "ninja_required_version = 1.3",
            f"nvcc = {quote(nvcc)}",
            "cuda_flags = " + " ".join(map(quote, cuda_flags)),
            "cxx_flags = " + " ".join(map(quote, cxx_flags)),
            "link_flags = " + " ".join(map(quote, link_flags)),
            "rule cuda",
            "  command = $nvcc $cuda_flags -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = nvcc $in",
            "rule cxx",
            "  command = $nvcc $cxx_flags -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = c++ $in",
            "rule link",
            "  command = $nvcc $link_flags $in -o $out",
            "  description = link $out",
        ]
        objects = []
        for source in sources:
            obj = build_dir / (source.name + ".o")
            objects.append(obj)
            rule = "cuda" if source.suffix == ".cu" else "cxx"
            lines.append(f"build {quote(str(obj))}: {rule} {quote(str(source))}")
        lines.append(f"build {quote(str(output))}: link " + " ".join(quote(str(o)) for o in objects))
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")

        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        print(f"maqd_kernels: building _C for sm_{', sm_'.join(archs)} (+PTX compute_{ptx_arch(archs)}) with {nvcc}")
        subprocess.run([find_ninja(), "-C", str(build_dir), "-j", jobs], check=True)


def extensions() -> list[Extension]:
    # The build backend runs this file once to ask what to install and again to build; say why _C
    # is skipped only on the run that builds.
    building = any(
        command in sys.argv for command in ("bdist_wheel", "editable_wheel", "build_ext", "build", "develop")
    )
    reason = None
    if os.environ.get("MAQD_SKIP_CUDA_BUILD", "0") == "1":
        reason = "MAQD_SKIP_CUDA_BUILD=1"
    elif find_nvcc() is None:
        reason = "nvcc not found"
    if reason is None:
        return [Extension("maqd_kernels._C", sources=[])]
    if building:
        print(
            f"maqd_kernels: {reason}, installing the pure-Python package without _C; "
            "the reference and Triton backends still work",
            file=sys.stderr,
        )
    return []


setup(ext_modules=extensions(), cmdclass={"build_ext": NinjaNvccBuild})
