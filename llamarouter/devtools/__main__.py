"""``python -m llamarouter.devtools make-model ...``"""

from llamarouter.devtools.cli import dev

if __name__ == "__main__":
    dev(prog_name="python -m llamarouter.devtools")
