"""atheris harness: RedirectToHTTPS's Location builder (see targets.py); run by fuzz/run.py."""

from harness import main

if __name__ == "__main__":
    main("redirect")
