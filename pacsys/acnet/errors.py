"""The status numbers of `Reading` and `WriteResult` fields, under the pacsys release's names.

A reading's status is a facility code and a signed error number (`pacsys.status`, where
this project names them). Tests written against the release compare the fakes' answers
with these names; its composite codes (facility + 256 * error number) are not provided.
"""

from pacsys.status import ACNET, ACNET_REQUEST_TIMEOUT, ACNET_RETRY, DBM, DBM_NO_SUCH_PROPERTY, DIO, DMQ, FTP

FACILITY_ACNET = ACNET
FACILITY_DIO = DIO
FACILITY_FTP = FTP
FACILITY_DBM = DBM
FACILITY_DMQ = DMQ

ERR_OK = 0
ERR_RETRY = ACNET_RETRY
ERR_TIMEOUT = ACNET_REQUEST_TIMEOUT
ERR_NOPROP = DBM_NO_SUCH_PROPERTY


def normalize_error_code(code: int) -> int:
    """An error number received as an unsigned byte, as the signed number it is (200 -> -56)."""
    return code - 256 if code > 127 else code
