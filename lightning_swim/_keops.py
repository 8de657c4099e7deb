"""KeOps set-up: where compiled formulas are cached, with which flags, and whether KeOps works here.

KeOps compiles every new formula with the system's C++ compiler once (about 10 s on a CPU) and
caches the binary. lightning_swim keeps the number of distinct formulas small (two per dtype and
padded input dimension) and keeps its cache apart from other KeOps users:

- the cache folder is ``$LIGHTNING_SWIM_KEOPS_CACHE`` if set, else
  ``~/.cache/lightning_swim/keops-<version>-<flags>`` (or call :func:`configure_keops` before the
  first map);
- on the CPU, formulas are compiled with ``-march=native`` and the floating-point flags that let
  g++ vectorise the reductions (measured 5.8x faster at d = 1000); a cache so built belongs to this
  processor, hence the flag hash in its name. ``LIGHTNING_SWIM_KEOPS_NATIVE=0`` turns this off, and
  an explicit ``CXXFLAGS`` is always respected.

Without a compiler, the import of pykeops only warns and the first new formula fails; every KeOps
path in lightning_swim has a plain-PyTorch twin that ``backend="auto"`` falls back to.

KeOps is imported quietly (:func:`pykeops_torch`, also before GeomLoss: :func:`import_geomloss`): what
it prints at import is caught; its notice that a machine without CUDA runs on the CPU ("CUDA libraries
not found ... Switching to CPU only") is dropped where PyTorch sees no GPU either, any other line is
raised as a ``RuntimeWarning``, and its messages while compiling are turned off. ``KEOPS_VERBOSE=1``
(or ``PYKEOPS_VERBOSE=1``) keeps all of its output, ``KEOPS_VERBOSE=0`` none.

A damaged cache never kills the process: compiled modules are checked before they are imported
(a truncated one would raise SIGBUS) and rebuilt if damaged, built into a temporary name and renamed
when whole, and damaged index files are removed before KeOps reads them (:func:`repair_cache`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["KeOpsUnavailableError", "configure_keops", "import_geomloss", "keops_cache_dir"]

NATIVE_FLAGS = "-march=native -fno-math-errno -fassociative-math -fno-signed-zeros -fno-trapping-math"

_state: dict[str, Any] = {"module": None, "error": None, "cache": None, "failed_formula": False}


class KeOpsUnavailableError(RuntimeError):
    """KeOps cannot be imported, or cannot compile a formula, on this machine."""


def _flags() -> str:
    if "CXXFLAGS" in os.environ:
        return os.environ["CXXFLAGS"]
    if os.environ.get("LIGHTNING_SWIM_KEOPS_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return ""
    return NATIVE_FLAGS


def _default_cache_dir() -> Path:
    try:
        from importlib.metadata import version

        keops_version = version("pykeops")
    except Exception:  # pragma: no cover - metadata missing: still a usable name
        keops_version = "unknown"
    tag = hashlib.sha1(_flags().encode()).hexdigest()[:8]
    base = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(base) / "lightning_swim" / f"keops-{keops_version}-{tag}"


def keops_cache_dir() -> Path:
    """The folder KeOps formulas are (or will be) compiled into."""
    if _state["cache"] is not None:
        return Path(_state["cache"])
    env = os.environ.get("LIGHTNING_SWIM_KEOPS_CACHE")
    return Path(env) if env else _default_cache_dir()


def configure_keops(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Choose the folder KeOps compiles into (call before the first map; later calls move it).

    Returns:
        The cache folder in use.
    """
    if cache_dir is not None:
        _state["cache"] = str(Path(cache_dir).expanduser())
    path = keops_cache_dir()
    if _state["module"] is not None:
        import pykeops

        path.mkdir(parents=True, exist_ok=True)
        pykeops.set_build_folder(str(path))
        repair_cache(path)
    return path


def pykeops_torch() -> ModuleType:
    """``pykeops.torch``, imported quietly with our cache folder and flags.

    Raises:
        KeOpsUnavailableError: if pykeops cannot be imported.
    """
    if _state["module"] is not None:
        return _state["module"]
    if _state["error"] is not None:
        raise KeOpsUnavailableError(_state["error"])
    flags = _flags()
    set_flags = bool(flags) and "CXXFLAGS" not in os.environ
    if set_flags:  # keopscore reads CXXFLAGS once, when its config is created at import
        os.environ["CXXFLAGS"] = flags
    _drop_damaged_indexes()  # `import pykeops` unpickles them, and fails on a truncated one
    said = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(said if _chosen_verbosity() is None else sys.stdout):
            warnings.simplefilter("ignore")
            import pykeops
            import pykeops.torch as pkt
    except Exception as err:  # ImportError, or a broken install failing at import with anything else
        _state["error"] = f"pykeops could not be imported: {type(err).__name__}: {err}"
        raise KeOpsUnavailableError(_state["error"]) from err
    finally:
        if set_flags:  # leave the process environment as it was (other C++ builds read it too)
            del os.environ["CXXFLAGS"]
        _pass_on(said.getvalue())
    if _chosen_verbosity() is None:
        pykeops.set_verbose(False)  # no "[KeOps] Compiling ..." lines in a training log
    path = keops_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    pykeops.set_build_folder(str(path))
    _guard_loader()
    repair_cache(path)
    _state["module"] = pkt
    return pkt


def import_geomloss() -> ModuleType:
    """``geomloss``, imported after KeOps (quietly, with our cache folder), which GeomLoss imports if it can."""
    with contextlib.suppress(KeOpsUnavailableError):  # without KeOps, GeomLoss works without it
        pykeops_torch()
    import geomloss

    return geomloss


_EXPECTED_NOTICES = ("Switching to CPU only",)  # KeOps on a machine without CUDA: what PyTorch already knows


def _chosen_verbosity() -> bool | None:
    """Whether the user asked KeOps to speak (``KEOPS_VERBOSE``/``PYKEOPS_VERBOSE``), None if they did not say."""
    values = [os.environ.get(k) for k in ("PYKEOPS_VERBOSE", "KEOPS_VERBOSE")]
    said = [v.strip() for v in values if v is not None and v.strip()]
    return None if not said else said[0] != "0"


def _pass_on(printed: str) -> None:
    """What KeOps printed at import, less its CPU-only notice on a machine without a GPU, as one warning."""
    import torch

    gpu = torch.cuda.is_available()
    lines = [
        line.strip()
        for line in printed.splitlines()
        if line.strip() and (gpu or not any(notice in line for notice in _EXPECTED_NOTICES))
    ]
    if lines:
        warnings.warn("lightning_swim: KeOps says: " + " ".join(lines), RuntimeWarning, stacklevel=3)


# -- a cache that cannot kill the process -----------------------------------------------------------
#
# pykeops 2.3 builds each formula's Python module with `g++ ... -o pykeops_cpp_<tag><EXT_SUFFIX>` straight
# into the cache folder and later imports whatever file has that name (LoadKeOps_cpp_class.init_phase1 /
# init_phase2). A build killed while linking leaves a truncated or zero-byte module under the final name:
# importing the first kills the process with SIGBUS (its segments extend past the end of the file), the
# second fails at every later run. Its formula indexes (`*_cache.pkl`, read by `import pykeops`) and the
# `<tag>.nfo` / `<tag>.cpp` files of keopscore are written in place too. So: verify a cached module
# before it is imported and rebuild it if it is damaged, build into a temporary name and rename it, and
# drop damaged index files before the import reads them.

_GUARD_FLAG = "_lightning_swim_guarded"


def verify_binary(path: str | os.PathLike[str]) -> str | None:
    """None if ``path`` looks like a complete shared library, else what is wrong with it.

    On ELF platforms (Linux), the headers must be whole and every loadable segment and the section
    header table must lie within the file: a truncated module fails this (importing it would raise
    SIGBUS). Elsewhere only an empty file is detected.
    """
    import struct

    p = Path(path)
    try:
        size = p.stat().st_size
        if size == 0:
            return "it is empty (zero bytes)"
        with open(p, "rb") as fh:
            head = fh.read(64)
            if head[:4] != b"\x7fELF":
                return None if sys.platform in ("darwin", "win32") else "it is not an ELF file"
            if len(head) < 52 or head[4] not in (1, 2) or head[5] not in (1, 2):
                return "its ELF header is truncated or invalid"
            is64, end = head[4] == 2, "<" if head[5] == 1 else ">"
            if is64:
                if len(head) < 64:
                    return "its ELF header is truncated"
                phoff, shoff = struct.unpack_from(end + "QQ", head, 32)
                phentsize, phnum, shentsize, shnum = struct.unpack_from(end + "HHHH", head, 54)
            else:
                phoff, shoff = struct.unpack_from(end + "II", head, 28)
                phentsize, phnum, shentsize, shnum = struct.unpack_from(end + "HHHH", head, 42)
            if phoff + phnum * phentsize > size or shoff + shnum * shentsize > size:
                return f"it is truncated ({size} bytes, its headers reach past the end)"
            fh.seek(phoff)
            table = fh.read(phnum * phentsize)
            for k in range(phnum):
                entry = table[k * phentsize : (k + 1) * phentsize]
                if is64:
                    p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(end + "IIQQQQ", entry)
                else:
                    p_type, p_offset, _, _, p_filesz = struct.unpack_from(end + "IIIII", entry)
                if p_type == 1 and p_offset + p_filesz > size:  # PT_LOAD
                    return f"it is truncated ({size} bytes, a loadable segment ends at {p_offset + p_filesz})"
    except OSError as err:
        return f"it cannot be read ({err})"
    return None


def _ext_suffix() -> str:
    import sysconfig

    return str(sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def _damaged_pickle(path: Path) -> str | None:
    """Why a pickle file is unusable (empty, truncated, not a pickle), walking its opcodes without loading it."""
    import pickletools

    try:
        data = path.read_bytes()
    except OSError as err:
        return f"it cannot be read ({err})"
    if not data:
        return "it is empty (zero bytes)"
    try:
        for _ in pickletools.genops(data):
            pass
    except Exception as err:
        return f"it is not a whole pickle ({type(err).__name__}: {err})"
    return None


def _keops_index_folder() -> Path | None:
    """Where ``import pykeops`` reads its formula indexes: keopscore's default build folder."""
    import importlib.util
    import platform

    spec = importlib.util.find_spec("keopscore")
    if spec is None or spec.origin is None:
        return None
    try:
        version = (Path(spec.origin).parent / "keops_version").read_text().strip()
    except OSError:
        return None
    root = os.getenv("KEOPS_CACHE_FOLDER") or str(Path.home() / ".cache" / f"keops{version}")
    return Path(root) / ("_".join(platform.uname()[:3]) + f"_p{sys.version.split(' ')[0]}")


def _drop_damaged_indexes() -> None:
    """Remove KeOps formula indexes (``*_cache.pkl``) that ``import pykeops`` would fail to read."""
    folder = _keops_index_folder()
    if folder is None or not folder.is_dir():
        return
    for file in folder.glob("*_cache.pkl"):
        why = _damaged_pickle(file)
        if why is not None:
            _warn_cache(f"KeOps' formula index {file} is damaged ({why}); it is removed (KeOps rebuilds it).")
            file.unlink(missing_ok=True)


def _warn_cache(message: str) -> None:
    warnings.warn(f"lightning_swim: {message}", RuntimeWarning, stacklevel=4)


def _nfo_ok(path: Path) -> bool:
    try:
        lines = path.read_text().split("\n")
    except (OSError, UnicodeDecodeError):
        return False
    keys = ("red_formula", "dim", "tagI", "dimy")
    return len(lines) == 4 and all(
        line.split("=", 1)[0] == k and "=" in line for line, k in zip(lines, keys, strict=True)
    )


def repair_cache(folder: str | os.PathLike[str]) -> list[str]:
    """Remove the damaged files of a KeOps build folder, so that KeOps rebuilds them; returns what was removed.

    Damaged: a compiled module that :func:`verify_binary` rejects; a ``<tag>.nfo`` that is not the
    four lines keopscore writes (with its ``<tag>.cpp``, which keopscore then regenerates); a
    ``<tag>.cpp`` without a module that does not end as generated code ends; leftovers of builds
    into temporary names.
    """
    folder = Path(folder)
    removed: list[str] = []

    def drop(p: Path, why: str) -> None:
        if p.exists():
            p.unlink(missing_ok=True)
            removed.append(f"{p.name} ({why})")

    suffix = _ext_suffix()
    for module in folder.glob(f"pykeops_cpp_*{suffix}"):
        why = verify_binary(module)
        if why is not None:
            drop(module, why)
    for tmp in folder.glob(".pykeops_cpp_*.tmp*"):
        drop(tmp, "a leftover of an interrupted build")
    for nfo in folder.glob("*.nfo"):
        if not _nfo_ok(nfo):
            tag = nfo.stem
            drop(nfo, "not a whole info file")
            drop(folder / f"{tag}.cpp", "its info file was damaged")
            drop(folder / f"pykeops_cpp_{tag}{suffix}", "its info file was damaged")
    for cpp in folder.glob("*.cpp"):
        if cpp.name.startswith("pykeops_cpp_") or (folder / f"pykeops_cpp_{cpp.stem}{suffix}").exists():
            continue
        try:
            complete = cpp.read_text().rstrip().endswith("}")
        except (OSError, UnicodeDecodeError):
            complete = False
        if not complete:
            drop(cpp, "truncated generated code")
            drop(folder / f"{cpp.stem}.nfo", "its code was truncated")
    if removed:
        _warn_cache(f"damaged KeOps cache files in {folder} are removed and will be rebuilt: {', '.join(removed)}.")
    return removed


def _build_module(loader: Any, module_path: str) -> None:
    """Compile a formula's Python module as pykeops does, but into a temporary name renamed when whole."""
    import importlib
    import subprocess

    import pykeops.config as pykeops_config

    folder = os.path.dirname(module_path)
    base = os.path.basename(module_path)
    token = f"{os.getpid()}.{_uuid_hex()}"
    tmp_src = os.path.join(folder, f".{base}.{token}.tmp.cpp")
    tmp_out = os.path.join(folder, f".{base}.{token}.tmp{_ext_suffix()}")
    try:
        with open(tmp_src, "w") as fh:
            fh.write(loader.get_pybind11_code())
        base_config = pykeops_config.pykeops_base
        command = (
            f"{base_config.get_cxx_compiler()} {base_config.get_cpp_flags()} {pykeops_config.python_includes} "
            f"{tmp_src} -o {tmp_out}"
        )
        done = subprocess.run(command, shell=True, capture_output=True, text=True)
        why = verify_binary(tmp_out) if os.path.exists(tmp_out) else "the compiler wrote no module"
        if done.returncode != 0 or why is not None:
            raise KeOpsUnavailableError(
                f"KeOps could not build {base} ({why or f'exit status {done.returncode}'}): {done.stderr[-500:]}"
            )
        os.replace(tmp_out, module_path)  # atomic: readers see no module or a whole one
        os.replace(tmp_src, os.path.join(folder, f"{base.split('.')[0]}.cpp"))
        importlib.invalidate_caches()
    finally:
        for leftover in (tmp_src, tmp_out):
            Path(leftover).unlink(missing_ok=True)


def _uuid_hex() -> str:
    import uuid

    return uuid.uuid4().hex[:8]


def _guard_loader() -> None:
    """Route pykeops' build and import of formula modules through a check and an atomic rebuild (once)."""
    try:
        from pykeops.common.keops_io import LoadKeOps_cpp as module
    except Exception:  # another layout (another pykeops version): nothing to guard
        return
    cls = getattr(module, "LoadKeOps_cpp_class", None)
    if cls is None or getattr(cls, _GUARD_FLAG, False) or not hasattr(cls, "get_pybind11_code"):
        return
    import_module = cls.init_phase2

    def module_path(self: Any) -> str:
        return str(module.pykeops_cpp_name(tag=self.params.tag, extension=_ext_suffix()))

    def ensure(self: Any) -> None:
        path = module_path(self)
        if os.path.exists(path):
            why = verify_binary(path)
            if why is None:
                return
            _warn_cache(f"the KeOps module {path} is damaged ({why}); it is rebuilt.")
            Path(path).unlink(missing_ok=True)
        _build_module(self, path)

    def init_phase1(self: Any) -> None:  # build when missing or damaged (pykeops: when missing)
        ensure(self)

    def init_phase2(self: Any) -> None:  # import, after the same check (also on pykeops' fast path)
        ensure(self)
        try:
            import_module(self)
        except ImportError as err:  # a module that passed the check and still fails: rebuild it once
            _warn_cache(f"the KeOps module {module_path(self)} failed to import ({err}); it is rebuilt.")
            Path(module_path(self)).unlink(missing_ok=True)
            _build_module(self, module_path(self))
            import_module(self)

    cls.init_phase1 = init_phase1
    cls.init_phase2 = init_phase2
    setattr(cls, _GUARD_FLAG, True)
