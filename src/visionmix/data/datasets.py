"""Temporary: only ``visionmix/cli.py`` (its ``predict`` command) still imports ``IMAGE_EXTENSIONS`` from here.

Delete this file when the CLI package of issue 25 (step 3) lands, importing it from :mod:`visionmix.data.decode`
(``cli/predict.py``); nothing else may import it.
"""

from visionmix.data.decode import IMAGE_EXTENSIONS

__all__ = ["IMAGE_EXTENSIONS"]
