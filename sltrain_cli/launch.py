"""`sltrain-torchrun`: torchrun itself, with the workers' exit code and one line instead of torch's traceback.

    sltrain-torchrun --standalone --nproc_per_node=2 -m sltrain_cli pretrain model=llama_60m ...

Arguments are torchrun's, unchanged (this calls ``torch.distributed.run.main``). Plain torchrun exits 1 with a
traceback whenever a worker fails or the launcher gets a signal, so a scheduler cannot tell an interrupted run
(resumable) from a crash. Here:

- the launcher got SIGINT / SIGTERM: torchrun forwards it to the workers, which save at the next step boundary
  and report ``interrupted``; the exit code is 128 + the signal (130 / 143);
- a worker failed: the exit code is the first failed worker's (130 / 143 interrupted, 3 diverged, 2 bad input,
  128 + N for a worker killed by signal N), with one line naming it.
"""
from __future__ import annotations

import signal
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(list(argv) if argv is not None else None)
    except SignalException as err:
        name = signal.Signals(err.sigval).name
        print(f"sltrain-torchrun: stopped by {name}; the workers were asked to save and stop at a step boundary "
              "(resume with the same command plus train.resume=true)", file=sys.stderr, flush=True)
        sys.exit(128 + int(err.sigval))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode  # -9: killed by SIGKILL
        how = (f"was killed by {signal.Signals(-failure.exitcode).name}" if failure.exitcode < 0
               else f"exited with code {code}")
        print(f"sltrain-torchrun: worker rank {rank} {how}; the run folder keeps its last checkpoint "
              "(resume with train.resume=true)", file=sys.stderr, flush=True)
        sys.exit(code)


if __name__ == "__main__":
    main()
