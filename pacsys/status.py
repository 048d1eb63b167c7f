"""ACNET status codes used by pacsys: a facility and a signed error number.

0 is success, above 0 a warning, below 0 an error (see docs/wire.md).
"""

ACNET = 1
DIO = 14
FTP = 15
DBM = 16
DPM = 17
DMQ = 72

ACNET_RETRY = -1
ACNET_REQUEST_TIMEOUT = -6
DBM_NO_SUCH_PROPERTY = -13
DPM_PRIVILEGE = -17
DPM_NO_SUCH_DEVICE = -26
DPM_NO_SUCH_PROPERTY = -27
DPM_BAD_RANGE = -28
DPM_BAD_EVENT = -33
DPM_INTERNAL = -45
DPM_PENDING = 1
DPM_STALE = 2

# Ours, in the DPM facility: a setting whose worker process died before it answered.
# The setting may or may not have reached the device; it is never replayed. Chosen
# outside the DPM numbers in common use so that it cannot be mistaken for one of them.
DPM_WRITE_OUTCOME_UNKNOWN = -120
