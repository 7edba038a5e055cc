import sys

if sys.platform == "win32":  # file locks (fcntl), POSIX signals and process groups throughout
    raise ImportError("vaebench runs on Linux and macOS; on Windows, run it under WSL 2 (the Windows "
                      "Subsystem for Linux)")
