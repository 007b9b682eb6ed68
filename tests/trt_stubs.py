"""Make the ``tensorrt-stubs`` wheel usable by mypy, and type-check against it.

Why: ``tensorrt-stubs`` 10.13 installs ``tensorrt/__init__.pyi`` and
``tensorrt_bindings/*.pyi`` without a ``py.typed`` marker, so mypy silently
treats ``import tensorrt`` as untyped (``Any``: nothing is checked). Following
them anyway (``follow_untyped_imports``) fails on a handful of syntax errors
in the generated stubs (a parameter named ``in``, a non-default parameter
after defaults, in plugin-API methods). This script copies the stubs into a
folder, replaces the parameter lists of the few unparsable ``def`` lines by
``*args: typing.Any, **kwargs: typing.Any`` and writes a mypy config that adds
the folder to ``mypy_path`` and silences errors *inside* the stubs only.

``make typecheck`` runs ``python tests/trt_stubs.py .venv/trt-typings`` once
after installing the stubs; ``[tool.mypy]`` in pyproject.toml points
``mypy_path`` at ``.venv/trt-typings/stubs``, so the whole package is checked
against the real TensorRT API. The tests use :func:`build` for their own
probes.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import shutil
import sys
from pathlib import Path

STUB_PACKAGES = ("tensorrt", "tensorrt_bindings")
_DEF = re.compile(r"^(?P<indent>\s*)def (?P<name>\w+)\((?P<params>.*)\)(?P<ret>\s*->.*)?:\s*$")


def stubs_site() -> Path | None:
    """The site-packages folder holding the tensorrt-stubs files, or None."""
    spec = importlib.util.find_spec("tensorrt_stubs")
    if spec is None or spec.origin is None:
        return None
    site = Path(spec.origin).parent.parent
    return site if (site / "tensorrt" / "__init__.pyi").is_file() else None


def _fix_file(path: Path) -> int:
    """Patch unparsable ``def`` lines until the stub parses; returns how many were patched."""
    lines = path.read_text().splitlines()
    patched = 0
    for _ in range(200):
        try:
            ast.parse("\n".join(lines), filename=str(path), feature_version=(3, 11))
            break
        except SyntaxError as exc:
            idx = (exc.lineno or 1) - 1
            match = _DEF.match(lines[idx])
            if match is None:
                raise RuntimeError(f"{path}:{exc.lineno}: cannot patch: {lines[idx]!r}") from exc
            first = match["params"].split(",")[0].strip()
            self_part = f"{first}, " if first.split(":")[0] in ("self", "cls") else ""
            lines[idx] = (f"{match['indent']}def {match['name']}({self_part}*args: typing.Any, "
                          f"**kwargs: typing.Any){match['ret'] or ''}:")
            patched += 1
    else:
        raise RuntimeError(f"{path}: still unparsable after 200 fixes")
    path.write_text("\n".join(lines) + "\n")
    return patched


def build(out_dir: Path) -> Path:
    """Copy and patch the stubs into ``out_dir/stubs``; write ``out_dir/mypy.ini``.

    Returns:
        The mypy config file (project settings + stub path + silenced stub errors).
    """
    site = stubs_site()
    if site is None:
        raise FileNotFoundError("tensorrt-stubs is not installed")
    stubs = out_dir / "stubs"
    if stubs.exists():
        shutil.rmtree(stubs)
    for pkg in STUB_PACKAGES:
        shutil.copytree(site / pkg, stubs / pkg, ignore=shutil.ignore_patterns("*.py", "*.pyc",
                                                                               "__pycache__"))
        for pyi in (stubs / pkg).rglob("*.pyi"):
            _fix_file(pyi)
    config = out_dir / "mypy.ini"
    config.write_text(
        "[mypy]\n"
        "python_version = 3.11\n"
        f"mypy_path = {stubs}\n"
        "ignore_missing_imports = True\n"
        "warn_unused_ignores = False\n"
        "check_untyped_defs = True\n"
        "\n"
        "[mypy-tensorrt,tensorrt.*,tensorrt_bindings,tensorrt_bindings.*]\n"
        "ignore_errors = True\n"
    )
    return config


def main(argv: list[str]) -> int:
    """``trt_stubs.py OUT_DIR``: write the patched stubs (and a mypy.ini) under OUT_DIR."""
    if len(argv) != 1:
        print("usage: python tests/trt_stubs.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    try:
        build(out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"tensorrt typings in {out / 'stubs'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
