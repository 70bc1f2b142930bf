"""Skip indicators, one file each (see ``base.Indicator`` for the interface). ``INDICATOR_CLASSES`` is the registry
the caches build theirs from; adding an indicator means one file here and one line below."""

from __future__ import annotations

from .base import Indicator
from .easycache import EasyCache
from .first_block import FirstBlock
from .interval import Interval
from .magcache import MagCache
from .teacache import InputChange, TeaCache

INDICATOR_CLASSES: dict[str, type[Indicator]] = {
    c.name: c for c in (InputChange, TeaCache, EasyCache, MagCache, FirstBlock, Interval)}
INDICATORS: dict[str, str] = {name: c.description for name, c in INDICATOR_CLASSES.items()}
NEEDS_CALIBRATION = frozenset(name for name, c in INDICATOR_CLASSES.items() if c.calibration is not None)

__all__ = ["INDICATORS", "INDICATOR_CLASSES", "NEEDS_CALIBRATION", "EasyCache", "FirstBlock", "Indicator",
           "InputChange", "Interval", "MagCache", "TeaCache"]
