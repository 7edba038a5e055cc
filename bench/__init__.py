import importlib.util
import signal
import sys
from pathlib import Path

if sys.platform == "win32":  # file locks (fcntl), POSIX signals and process groups throughout
    raise ImportError("vaebench runs on Linux and macOS; on Windows, run it under WSL 2 (the Windows "
                      "Subsystem for Linux)")


def _check_models_package() -> None:
    """vaebench's `models` package is installed beside `bench`; a `models.py` or a `models/` package (with
    an __init__.py) of the user's (common in ML projects) in the current folder comes first on sys.path,
    and would fail later with an ImportError naming neither. (A plain `models/` folder, of checkpoints say,
    hides nothing: Python looks past a folder without __init__.py.)"""
    ours = Path(__file__).resolve().parent.parent / "models"
    spec = importlib.util.find_spec("models")
    if spec is None or spec.origin in (None, "namespace"):  # the import below says what is missing
        return
    if ours not in [Path(p).resolve() for p in (spec.submodule_search_locations or [])]:
        raise ImportError(f"vaebench's package 'models' ({ours}) is hidden by {spec.origin}, earlier on sys.path "
                          "(where the current folder comes first): rename it, or run from another folder")


_check_models_package()


def _interrupted_while_starting(signum: int, frame) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while half-imported torch shuts down
    sys.stderr.write("\ninterrupted: nothing was written\n")
    raise SystemExit(128 + signum)


COMMANDS = ("bench.run", "bench.report")  # each calls command_starts() first


def _starting_a_command() -> bool:
    """Whether Python is importing this package to run bench.run or bench.report with -m (however its flags
    are spelt: `-m bench.run`, `-mbench.run`, `-um bench.run`), not for another module run with -m that
    imports bench (its own Ctrl-C stays): runpy's frame, which names the module, is below this import."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "_run_module_as_main" and frame.f_globals.get("__name__") == "runpy":
            return frame.f_locals.get("mod_name") in COMMANDS
        frame = frame.f_back
    return False


# A Ctrl-C in the seconds a command's imports take (torch, MLflow) ends it with one line, as one before the
# study starts does, not with the traceback of a library's import.
if _starting_a_command() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_while_starting)


def command_starts() -> None:
    """Python's own Ctrl-C handler back, which the command's stops (bench.stopping) build on."""
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)
