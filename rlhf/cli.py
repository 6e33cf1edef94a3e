"""How a step's command-line entry point (python -m rlhf.sft / rlhf.reward / rlhf.ppo) ends.

Under a launcher every rank writes to one log, so each failure ends with one line naming its rank,
`rank R: error: ...` (rlhf.train reads it to say what failed). Bad input that our own checks refuse (a
ValueError raised in rlhf or hybrid_engine: a flag, a file, the data) is that line alone, never a
traceback from inside training; anything else keeps its traceback above the line."""
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

import hybrid_engine
from hybrid_engine.distributed import destroy_process_groups

OUR_CODE = (Path(__file__).resolve().parent, Path(hybrid_engine.__file__).resolve().parent)


def refused_by_our_checks(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return (isinstance(error, ValueError) and bool(frames)
            and any(Path(frames[-1].filename).resolve().is_relative_to(root) for root in OUR_CODE))


def error_line(error: BaseException) -> str:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    who = f"rank {os.environ.get('RANK', '?')}: " if world > 1 else ""
    if refused_by_our_checks(error):
        return f"{who}error: {error}"
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{who}error: {type(error).__name__}: {first_line}"


def run(main: Callable[[], None]) -> None:
    """main(), then the process groups torn down; on an exception, the error line and exit status 1."""
    try:
        main()
    except Exception as error:
        if not refused_by_our_checks(error):
            traceback.print_exc()
        print(error_line(error), file=sys.stderr, flush=True)
        sys.stdout.flush()
        # no barrier and no gloo teardown at exit: the other ranks may be inside a collective
        os._exit(1)
    destroy_process_groups()
