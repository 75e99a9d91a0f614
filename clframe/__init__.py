"""clframe: continual-learning experiments with prompt-based and PEFT strategies on timm ViTs."""
__version__ = "0.1.0"


def _source_checkout_layout() -> None:
    """Run from a source checkout that was never installed (e.g. a copy on a GPU host), the
    repository's top-level scenarios/, strategies/ and configs/ are still clframe.scenarios,
    clframe.strategies and clframe.configs, as the installed package maps them (pyproject.toml).
    Only a checkout (pyproject.toml beside the package) is extended, never an installed wheel."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "strategies" / "base.py").is_file():
        if str(root) not in __path__:
            __path__.append(str(root))


_source_checkout_layout()
