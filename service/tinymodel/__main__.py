"""``python -m service.tinymodel OUT.gguf [--seed N]``: write the tiny model."""

from .tiny import main

raise SystemExit(main())
