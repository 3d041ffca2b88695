"""The one error hierarchy of emix.

Every message is written for the person who has to act on it (a PACS administrator,
a clinician) and never contains PHI: no patient names, IDs, UIDs or file contents.
"""

from __future__ import annotations


class EmixError(Exception):
    """Base of every error emix raises on purpose.

    :param message: what went wrong and what to do about it, without PHI.
    """

    #: HTTP status the hub answers with when this error escapes a request.
    http_status: int = 500
    #: Short machine-readable code, stable across releases.
    code: str = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(EmixError):
    """Configuration is missing or invalid (a home not initialised, a bad TOML value)."""

    http_status = 500
    code = "config"


class InvalidInput(EmixError):
    """Input that emix refuses: malformed request, hostile name, unknown format."""

    http_status = 400
    code = "invalid_input"


class NotDicomError(InvalidInput):
    """A file expected to be DICOM is not DICOM (recognised by content, not by name)."""

    code = "not_dicom"


class TruncatedDicomError(InvalidInput):
    """A DICOM file ends before its declared content does."""

    code = "truncated_dicom"


class UnsafePathError(InvalidInput):
    """A name would escape its folder (``../``, absolute path, NUL, device, link)."""

    code = "unsafe_path"


class ReportFormatError(InvalidInput):
    """A report cannot be parsed or rendered in the requested format."""

    code = "report_format"


class IntegrityError(EmixError):
    """Bytes, a signature or a chain do not verify: tampering or corruption."""

    http_status = 422
    code = "integrity"


class AuthenticationError(EmixError):
    """Missing, wrong, expired or revoked credentials."""

    http_status = 401
    code = "unauthenticated"


class NotFoundError(EmixError):
    """Not there, or not visible to the caller (emix never says which)."""

    http_status = 404
    code = "not_found"


class ConflictError(EmixError):
    """The request conflicts with current state (already sealed, already exists)."""

    http_status = 409
    code = "conflict"


class PackageNotSealed(ConflictError):
    """A progressive package is still open: its sender has not sealed it yet."""

    code = "not_sealed"


class NotAcceptable(EmixError):
    """The caller asks for a representation emix cannot make (a transfer syntax, a type)."""

    http_status = 406
    code = "not_acceptable"


class PayloadTooLarge(EmixError):
    """A body or a package exceeds a configured limit."""

    http_status = 413
    code = "too_large"


class PolicyRejected(EmixError):
    """A plugin's policy refused the operation (``emix_before_send``)."""

    http_status = 403
    code = "policy"


class LaunchRejected(EmixError):
    """A sign-in through an outside identity provider (a SMART on FHIR launch from an EMR)
    was refused: unknown issuer, bad or replayed state, a token that does not verify."""

    http_status = 403
    code = "launch_rejected"


class HubUnavailable(EmixError):
    """The hub could not be reached or answered with a server error; retry later."""

    http_status = 503
    code = "unavailable"


class StorageUnavailable(EmixError):
    """The hub's object store did not answer or refused its credentials; retry later."""

    http_status = 503
    code = "storage_unavailable"
