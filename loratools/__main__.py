from loratools.cli import entry

entry()
