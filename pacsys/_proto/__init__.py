"""Generated DAQ wire-contract modules; edit proto/ and run `python -m pacsys._proto.regen`, never these."""
