import signal as _signal

# before anything is imported: a Ctrl-C in the first milliseconds exits 130 quietly
_signal.signal(_signal.SIGINT, lambda *_: __import__("os")._exit(130))
_signal.signal(_signal.SIGTERM, lambda *_: __import__("os")._exit(143))

from bnstat import cli  # noqa: E402

if __name__ == "__main__":
    cli.CONSOLE = True
    cli.main()
