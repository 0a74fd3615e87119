"""torchrun, but exiting with its workers' own exit code when they fail.

torchrun turns every worker failure into exit status 1, which would hide the trainer's requeue
code (llamatrain.train.REQUEUE_EXIT_CODE, 75: "checkpoint saved, start me again") from the launch
scripts; and it ends with a traceback when it is itself terminated. Arguments are torchrun's;
`python launch/torchrun_exit.py ARGS` behaves like `torchrun ARGS` in every other way.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main


def workers_exit_code(error: ChildFailedError) -> int:
    """The failed workers' common exit code (128 + N for signal N, as a shell reports it); 1 when
    they disagree, so that a requeue code from some ranks and a crash on others is a failure."""
    codes = {f.exitcode for f in error.failures.values()}
    if len(codes) != 1:
        return 1
    code = codes.pop()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    try:
        main()
    except ChildFailedError as error:
        code = workers_exit_code(error)
        ranks = ",".join(str(rank) for rank in sorted(error.failures))
        print(f"torchrun: workers (ranks {ranks}) exited with {code}", file=sys.stderr)
        sys.exit(code)
    except SignalException as error:
        # torchrun passed the signal on to the workers and waited for them to stop.
        print(f"torchrun: stopped by {error.sigval.name}", file=sys.stderr)
        sys.exit(128 + error.sigval)
