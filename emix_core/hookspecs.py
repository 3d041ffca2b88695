"""Every hook emix calls, grouped by concern: exchange, security, audit, host.

Plugins implement these with :data:`emix_core.plugins.hookimpl`. Hooks are always
called with keyword arguments. A hook marked *firstresult* stops at the first plugin
that returns something other than ``None`` and returns that value; built-in defaults
are registered with ``trylast=True``, so an installed plugin answers first and
overrides them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from emix_core.model import AuditEvent, Package, Principal, Recipient
    from emix_core.reports.model import Report

hookspec = pluggy.HookspecMarker("emix")

__all__ = [
    "hookspec",
    "emix_register_sources",
    "emix_register_destinations",
    "emix_package_sealed",
    "emix_package_received",
    "emix_render_report",
    "emix_parse_report",
    "emix_notify",
    "emix_pacs_push",
    "emix_reconcile_patient",
    "emix_register_report_formats",
    "emix_authenticate",
    "emix_authorize",
    "emix_before_send",
    "emix_key_wrapper",
    "emix_audit_signing_key",
    "emix_audit_event",
    "emix_register_commands",
    "emix_register_blueprints",
    "emix_register_stores",
]

# --------------------------------------------------------------------------- exchange


@hookspec
def emix_register_sources(register: Callable[..., None]) -> None:
    """Register gateway sources: where studies come from (folder, PACS, CD).

    :param register: call ``register(kind, factory)``; ``factory(settings, gateway)``
        builds a source from the ``[[sources]]`` table of ``gateway.toml`` whose
        ``kind`` matches. Register only kinds the plugin really provides.

    .. versionadded:: 0.1
    """


@hookspec
def emix_register_destinations(register: Callable[..., None]) -> None:
    """Register gateway destinations: where arrived packages go (folder, PACS, EMR).

    :param register: call ``register(kind, factory)``; ``factory(settings, gateway)``
        builds a destination from a ``[[destinations]]`` table of ``gateway.toml``.

    .. versionadded:: 0.1
    """


@hookspec
def emix_package_sealed(package: Package) -> None:
    """Notification: a package was sealed on the hub and is now visible to recipients.

    :param package: the sealed package, with its manifest items.

    .. versionadded:: 0.1
    """


@hookspec
def emix_package_received(package: Package, path: str) -> None:
    """Notification: a package was received, verified and written on the receiving side.

    :param package: the package, with its manifest items.
    :param path: the folder the package was written to.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def emix_render_report(report: Report, format: str) -> bytes | None:
    """Render a report in a format (``hl7``, ``cda``, ``fhir``, ``pdf``, ``rtf``, ``txt``).

    firstresult: stops at the first plugin that returns bytes; return ``None`` for a
    format you do not render.

    :param report: the report to render.
    :param format: the target format name.
    :return: the encoded document, or ``None``.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def emix_parse_report(data: bytes, media_type: str) -> Report | None:
    """Parse a document into a report.

    firstresult: stops at the first plugin that returns a report; return ``None`` when
    the data is not in a format you read.

    :param data: the document's bytes (already size-limited by the caller).
    :param media_type: the declared or sniffed media type, e.g. ``application/hl7-v2``.
    :return: the parsed report, or ``None``.

    .. versionadded:: 0.1
    """


@hookspec
def emix_register_report_formats(register: Callable[..., None]) -> None:
    """Register report formats: the one list of formats a facility may prefer.

    :param register: call ``register(name, media_type, extension, readable=False)``;
        ``name`` is a short lowercase word (``hl7``, ``pdf``), ``extension`` the file
        extension received reports are written with (``.hl7``), ``readable`` whether
        the plugin's ``emix_parse_report`` reads it back. A plugin that registers a
        format must also render it (``emix_render_report``).

    .. versionadded:: 0.2
    """


@hookspec(firstresult=True)
def emix_pacs_push(content: Any, target: str) -> dict[str, Any] | None:
    """Store a package's DICOM instances into a PACS the hub cannot reach by DICOMweb.

    Called by the hub when a member sends a package to the facility's PACS ("Send to my
    PACS") and the administrator named it by something other than a DICOMweb URL, e.g.
    a DICOM node ``AET@HOST:PORT`` (the dimse plugin answers those with C-STORE).

    firstresult: stops at the first plugin that returns a report; return ``None`` for a
    target you do not understand.

    :param content: the opened package (:class:`emix_core.PackageContent`):
        ``dicom_items()`` lists the instances, ``read_item(id)`` streams one's bytes.
    :param target: the PACS as the facility's administrator named it.
    :return: ``{"stored": n, "failed": n, "errors": [text, ...]}`` (texts without PHI),
        or ``None``.
    :raises EmixError: the PACS cannot be reached at all.

    .. versionadded:: 0.2
    """


@hookspec(firstresult=True)
def emix_notify(recipient: Recipient, email: str, package: Package, link: str) -> bool | None:
    """Tell someone that a package is waiting. The message must contain no PHI.

    firstresult: stops at the first plugin that returns ``True`` (it delivered the
    notice); the built-in SMTP notifier runs last.

    :param recipient: the addressee of the package.
    :param email: the address to notify.
    :param package: the sealed package (do not put its studies in the message).
    :param link: the link to the package, built from the hub's configured public URL.
    :return: ``True`` once the notice was sent.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def emix_reconcile_patient(
    patient: dict[str, str], local_patient_id: str | None, source: str
) -> dict[str, str] | None:
    """Reconcile a foreign patient with the local one before an import (IHE IRWF.b).

    Studies that arrive on a CD or USB stick carry the patient id of the hospital that
    wrote them. An importer asks this hook which local identity they take; a plugin may
    look the patient up in a master patient index. The importer writes the answer into
    the patient attributes of every instance, keeps the foreign id and its issuer in
    *Other Patient IDs Sequence*, and never changes pixel data.

    firstresult: stops at the first plugin that returns a dict; the built-in default
    (registered ``trylast``) maps to ``local_patient_id`` when one was given and keeps
    the instances unchanged otherwise.

    :param patient: the foreign identity as read from the media, by DICOM keyword:
        ``PatientID``, ``IssuerOfPatientID``, ``PatientName``, ``PatientBirthDate``,
        ``PatientSex`` (empty strings when absent). PHI: never log it.
    :param local_patient_id: the local id the user asked for (``--patient-id``), or
        ``None``.
    :param source: where the studies come from, e.g. ``cd``.
    :return: the attributes to write (same keywords; ``{}`` keeps the instances as they
        are), or ``None`` to let the next plugin answer.

    .. versionadded:: 0.2
    """


# --------------------------------------------------------------------------- security


@hookspec(firstresult=True)
def emix_authenticate(request: Any) -> Principal | None:
    """Find out who is calling the hub.

    firstresult: stops at the first plugin that returns a principal; ``None`` from
    every plugin means unauthenticated (401).

    :param request: the Flask request.
    :return: the authenticated principal, or ``None``.

    .. versionadded:: 0.1
    """


@hookspec
def emix_authorize(principal: Principal, action: str, resource: Any) -> bool | None:
    """Decide whether a principal may do an action on a resource.

    Deny by default: any ``False`` denies, and at least one ``True`` is needed.
    Return ``None`` to abstain.

    :param principal: the caller.
    :param action: e.g. ``package:read``, ``package:create``, ``member:add``.
    :param resource: the object acted on (a :class:`~emix_core.model.Package`, a
        facility address, ...).

    .. versionadded:: 0.1
    """


@hookspec
def emix_before_send(package: Package) -> None:
    """Intervention before a package is sealed on the sending side.

    Raise :class:`emix_core.errors.PolicyRejected` to refuse (policy, size,
    de-identification required...). Every plugin is called.

    :param package: the package about to be sealed, with its items.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def emix_key_wrapper(home: str) -> Any | None:
    """Provide the key wrapper that protects package data keys (a key provider).

    firstresult: stops at the first plugin that returns a wrapper; the default wraps
    with the hub's key-encryption key file. A KMS or HSM plugin overrides it.

    :param home: the hub's home folder.
    :return: an object with ``wrap(key, context) -> bytes`` and
        ``unwrap(wrapped, context) -> bytes``, or ``None``.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def emix_audit_signing_key(home: str) -> Any | None:
    """Provide the key that signs the hub's audit checkpoints (a key provider).

    firstresult: stops at the first plugin that returns a signer; the default loads the
    Ed25519 key file ``[hub] audit_signing_key`` (else ``<home>/keys/hub-signing.key``).
    A plugin keeps it in an HSM or a KMS instead, so that whoever can rewrite the audit
    log on the hub's disk still cannot sign a checkpoint for the rewritten chain. The
    hub signs a probe with it and checks the signature at start.

    :param home: the hub's home folder.
    :return: an object with ``public_key_b64`` (raw Ed25519 public key, base64),
        ``fingerprint`` (as :func:`emix_core.crypto.fingerprint_of` computes it) and
        ``sign(data: bytes) -> str`` (base64 Ed25519 signature), or ``None``.

    .. versionadded:: 0.2
    """


# --------------------------------------------------------------------------- audit


@hookspec
def emix_audit_event(event: AuditEvent, home: str | None) -> None:
    """Notification: an auditable action happened. Every plugin may record or forward it.

    The built-in recorder appends it to the hash-chained log of the process's home.

    :param event: the audit event; ``event.phi`` holds PHI, handle it accordingly.
    :param home: the home folder whose log recorded it (hub or facility side), so a
        forwarder can read that home's ``emix.toml``; ``None`` when unknown.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2 ``home``.
    """


# --------------------------------------------------------------------------- host


@hookspec
def emix_register_commands(cli: click.Group) -> None:
    """Add commands to the ``emix`` command line.

    :param cli: the top-level click group; call ``cli.add_command(...)``.

    .. versionadded:: 0.1
    """


@hookspec
def emix_register_blueprints(register: Callable[..., None]) -> None:
    """Add HTTP endpoints to the hub.

    :param register: call ``register(blueprint, url_prefix=None)`` with a Flask
        blueprint. Endpoints must authenticate: :func:`emix_core.hub.auth.current_principal`,
        or :func:`emix_core.hub.auth.require` to authorize as well (404 when denied).

    .. versionadded:: 0.1
    """


@hookspec
def emix_register_stores(register: Callable[..., None]) -> None:
    """Register blob store engines, chosen by URL scheme in the hub's config.

    :param register: call ``register(scheme, factory)``; ``factory(url, home)`` returns
        a :class:`emix_core.store.blobs.BlobStore`.

    .. versionadded:: 0.1
    """
