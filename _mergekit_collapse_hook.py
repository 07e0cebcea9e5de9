"""Import hook that adds `--guard` to mergekit's own `mergekit-yaml` (loaded by
mergekit_collapse_hook.pth).

MergeKit has no plugin entry point, so this module, imported at interpreter start-up by a `.pth`
file, puts one tiny finder at the front of `sys.meta_path`. It answers only for
`mergekit.scripts.run_yaml`: it lets the normal machinery find and run that module, then hands the
module to `mergekit_collapse.cli.mergekit_yaml.install_guard`, which adds the guard options to its
click command. Nothing else is imported at start-up (only `sys` and `os`, which are already loaded).

Fail-safe: any exception while finding, wrapping or installing is logged at debug level and plain
mergekit carries on. Setting MERGEKIT_COLLAPSE_DISABLE=1 installs nothing at all.
"""


import os
import sys

TARGET = "mergekit.scripts.run_yaml"
#: the same variable as mergekit_collapse.constants.ENV_DISABLE (not imported: start-up must stay
#: cheap)
ENV_DISABLE = "MERGEKIT_COLLAPSE_DISABLE"


def _debug(message: str) -> None:
    import logging

    logging.getLogger("mergekit_collapse.hook").debug(message, exc_info=True)


def disabled() -> bool:
    """True when the user switched the hook off with MERGEKIT_COLLAPSE_DISABLE."""
    return os.environ.get(ENV_DISABLE, "").strip().lower() in {"1", "true", "yes", "on"}


class _GuardLoader:
    """Wraps the real loader of mergekit.scripts.run_yaml; everything else is delegated to it."""

    def __init__(self, inner: object) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> object:  # get_code, get_source, is_package, ...
        return getattr(self._inner, name)

    def create_module(self, spec: object) -> object:
        create = getattr(self._inner, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: object) -> None:
        self._inner.exec_module(module)  # mergekit's own code: its errors are its own
        try:
            if disabled():
                return
            from mergekit_collapse.cli.mergekit_yaml import install_guard

            install_guard(module)
        except Exception:  # noqa: BLE001 - fail-safe: plain mergekit must keep working
            _debug("mergekit-collapse: guard hook not installed; plain mergekit-yaml")


class GuardFinder:
    """A meta-path finder that only ever answers for mergekit.scripts.run_yaml."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        """Find the real spec with the other finders and wrap its loader.

        Args:
            fullname: the module being imported. path, target: as for any meta-path finder.

        Returns:
            The wrapped spec for mergekit.scripts.run_yaml; None for every other module.
        """
        if fullname != TARGET:
            return None
        try:
            for finder in list(sys.meta_path):
                if isinstance(finder, GuardFinder):
                    continue
                find = getattr(finder, "find_spec", None)
                spec = find(fullname, path, target) if find is not None else None
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        spec.loader = _GuardLoader(spec.loader)
                        uninstall()  # its one job is done: later imports skip it
                    return spec
        except Exception:  # noqa: BLE001 - fail-safe: let the normal import go ahead
            _debug("mergekit-collapse: hook finder failed")
        return None


_FINDER = GuardFinder()


def install() -> None:
    """Put the finder at the front of sys.meta_path (idempotent; nothing when disabled)."""
    if disabled() or TARGET in sys.modules:
        return
    if not any(isinstance(f, GuardFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    """Take the finder out of sys.meta_path (a new list: importlib may be iterating the old one)."""
    sys.meta_path = [f for f in sys.meta_path if not isinstance(f, GuardFinder)]


try:  # noqa: SIM105 - contextlib is not loaded at start-up; importing it would cost time
    install()
except Exception:  # noqa: BLE001 - never break interpreter start-up
    pass
