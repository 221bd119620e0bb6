"""atheris harness: the http_head parser(s) (see targets.py); run by fuzz/run.py."""

from harness import main

if __name__ == "__main__":
    main("http_head")
