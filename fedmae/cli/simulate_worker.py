"""A ``fedmae simulate`` worker process: ``python -m fedmae.cli.simulate_worker SPEC``.

Runs the virtual sites its spec names (``client_agent.simulation.Worker``) until the
run ends; SIGTERM or Ctrl-C stops every site and the process.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

from fedmae.log_format import setup_logging
from fedmae.runtime import tune_malloc


def main(argv: list[str] | None = None) -> int:
    from client_agent.simulation import Worker, WorkerSpec

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fedmae.cli.simulate_worker SPEC.json", file=sys.stderr)
        return 2
    tune_malloc()
    setup_logging(os.environ.get("FEDMAE_LOG_LEVEL", "INFO"), "worker", "text")
    spec_path = Path(args[0])
    worker = Worker(WorkerSpec.read(spec_path))
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    signal.signal(signal.SIGINT, lambda *_: worker.stop())
    logging.getLogger("fedmae").info("worker %s: %d sites", spec_path.stem, len(worker.sites))
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
