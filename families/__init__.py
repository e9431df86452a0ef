"""Model families, one module each (wan, wan22, ltx, toy), and the registry they enter.

`from flowblend.families import get_family, load_pair` is the API; importing this package registers
the built-in families. A family outside flowblend builds a `PairFamily` with its `Architecture` and
calls `register_family` (tests/test_new_family.py does, for CogVideoX).
"""
from .loading import LoadedPair, check_compatible, load_pair, load_transformer
from .registry import (
    ARCHITECTURES,
    FAMILIES,
    Architecture,
    PairFamily,
    architecture_of,
    check_models_compatible,
    get_family,
    reference_configs,
    register_family,
)

# isort: off
from . import wan, wan22, ltx, toy  # noqa: E402,F401 - each registers its family, in this order
# isort: on

__all__ = ["ARCHITECTURES", "FAMILIES", "Architecture", "LoadedPair", "PairFamily", "architecture_of",
           "check_compatible", "check_models_compatible", "get_family", "load_pair", "load_transformer",
           "reference_configs", "register_family"]
