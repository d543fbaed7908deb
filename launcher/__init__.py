import time as _time

# When the command began (imports included): what "finished in" counts from.
STARTED = _time.monotonic()
