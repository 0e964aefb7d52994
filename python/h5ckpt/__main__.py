"""``python -m h5ckpt``: the command line."""

from .cli import main

raise SystemExit(main())
