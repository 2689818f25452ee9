"""``python -m visionmix ...`` (and ``torchrun --nproc_per_node=N -m visionmix train ...``)."""

from visionmix.cli import main

raise SystemExit(main())
