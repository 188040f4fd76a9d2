"""``python -m orchestrator.tracking sync DIR [--tracking-uri URI]``: replay offline journals into MLflow."""

import sys

from orchestrator.tracking.journal import main

sys.exit(main())
