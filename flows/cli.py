"""The ``photref`` command line (filled in by the ingestion issue)."""


def main(argv=None):
    raise SystemExit("photref: not yet implemented")
