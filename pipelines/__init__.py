"""Stage recipes: one file per stage, each `python -m pipelines.STAGE --config X.yaml [k=v ...]`."""
import sys
from pathlib import Path

# Inside `ray job submit --working-dir .` the project may not be installed on the node: make the core package
# (platform/raylm) importable from the working directory. Workers get it through the runtime_env py_modules.
_platform_dir = Path(__file__).resolve().parents[1] / "platform"
if _platform_dir.is_dir() and str(_platform_dir) not in sys.path:
    try:
        import raylm  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(_platform_dir))
