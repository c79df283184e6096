"""The launcher's one error type: a bad command line or setup, reported without a traceback."""


class LaunchError(ValueError):
    """Invalid launch request (bad option, missing file, port in use...).

    ``distrib`` prints the message and exits with status 2, like an argparse usage error.
    """
