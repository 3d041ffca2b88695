"""emix: an open, vendor-neutral exchange of medical images and reports.

This module is **the public API**. Plugins, examples and adapter tests import from
``emix_core`` (and ``emix_core.testing`` for fixtures) and nothing deeper, the way a
pytest plugin imports ``pytest`` and never ``_pytest``. Everything under the
sub-packages is internal and may change between releases; a name listed in
:data:`__all__` follows the compatibility policy in ``docs/plugins.md``.

Names are resolved lazily (PEP 562), so ``import emix_core`` costs almost nothing and
the command line starts fast; type checkers see the real imports below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: The release (``pyproject.toml`` reads it from here: no metadata lookup at start-up).
__version__ = "0.2.0"

#: Public name -> module that defines it (``module:attribute`` when named otherwise there).
_EXPORTS: dict[str, str] = {
    # plugins and hooks
    "hookimpl": "emix_core.plugins",
    "get_plugin_manager": "emix_core.plugins",
    "default_plugin_manager": "emix_core.plugins",
    "Hooks": "emix_core.plugins",
    "hooks_for": "emix_core.plugins",
    "PluginManager": "emix_core.plugins",
    # domain model
    "Package": "emix_core.model",
    "Item": "emix_core.model",
    "Recipient": "emix_core.model",
    "Principal": "emix_core.model",
    "AuditEvent": "emix_core.model",
    "AuditAction": "emix_core.model",
    "AuditOutcome": "emix_core.model",
    "utcnow": "emix_core.model",
    "is_valid_address": "emix_core.model",
    # errors
    "EmixError": "emix_core.errors",
    "ConfigError": "emix_core.errors",
    "InvalidInput": "emix_core.errors",
    "NotDicomError": "emix_core.errors",
    "TruncatedDicomError": "emix_core.errors",
    "UnsafePathError": "emix_core.errors",
    "ReportFormatError": "emix_core.errors",
    "IntegrityError": "emix_core.errors",
    "AuthenticationError": "emix_core.errors",
    "NotFoundError": "emix_core.errors",
    "ConflictError": "emix_core.errors",
    "PackageNotSealed": "emix_core.errors",
    "PayloadTooLarge": "emix_core.errors",
    "PolicyRejected": "emix_core.errors",
    "HubUnavailable": "emix_core.errors",
    "LaunchRejected": "emix_core.errors",
    "NotAcceptable": "emix_core.errors",
    # content of a package
    "DICOM_MEDIA_TYPE": "emix_core.content.layout",
    "item_relative_path": "emix_core.content.layout",
    "is_valid_uid": "emix_core.content.uids",
    "is_dicom": "emix_core.content.dicom",
    "inspect_instance": "emix_core.content.dicom",
    "DicomInstance": "emix_core.content.dicom",
    "classify": "emix_core.content.documents",
    "REPORT_MEDIA_TYPES": "emix_core.content.documents",
    "safe_name": "emix_core.content.documents",
    "generate_study": "emix_core.content.samples",
    "new_uid": "emix_core.content.uids",
    "write_sample_report_pdf": "emix_core.content.samples",
    "write_sample_report_txt": "emix_core.content.samples",
    "write_pdi_iso": "emix_core.content.disc",
    "write_pdi_folder": "emix_core.content.disc",
    # the facility side
    "HubClient": "emix_core.client.hub",
    "PACKAGE_ID_RE": "emix_core.client.hub",
    "LocalHome": "emix_core.client.home",
    "resolve_home": "emix_core.config",
    "send_paths": "emix_core.client.sender",
    "SendResult": "emix_core.client.sender",
    "SKIPPED_NAMES": "emix_core.client.sender",
    "receive_package": "emix_core.client.receiver",
    "ReceivedPackage": "emix_core.client.receiver",
    # the gateway
    "Gateway": "emix_core.gateway.runner",
    "Source": "emix_core.gateway.runner",
    "Destination": "emix_core.gateway.runner",
    "ProgressiveDestination": "emix_core.gateway.runner",
    "SourceFactory": "emix_core.gateway.runner",
    "DestinationFactory": "emix_core.gateway.runner",
    "load_gateway": "emix_core.gateway.runner",
    "registered_kinds": "emix_core.gateway.runner",
    "open_journal": "emix_core.gateway.runner",
    "JournalConnections": "emix_core.gateway.runner",
    "retry_delay": "emix_core.gateway.runner",
    "log_event": "emix_core.gateway.runner",
    "time_now": "emix_core.gateway.runner",
    "package_from_folder": "emix_core.gateway.inbound",
    # hub endpoints added by plugins
    "require": "emix_core.hub.auth",
    "current_principal": "emix_core.hub.auth",
    "is_allowed": "emix_core.hub.auth",
    "client_source": "emix_core.hub.auth",
    "PackageContent": "emix_core.hub.reader",
    "open_package": "emix_core.hub.reader",
    "readable_packages": "emix_core.hub.reader",
    "hub_public_url": "emix_core.hub.reader",
    "hub_settings": "emix_core.hub.reader",
    "audit_hub_event": "emix_core.hub.reader",
    "PluginRecords": "emix_core.hub.web_plugins",
    "hub_config_table": "emix_core.hub.web_plugins",
    "hub_hooks": "emix_core.hub.web_plugins",
    "member_principal": "emix_core.hub.web_plugins",
    "sign_in_member": "emix_core.hub.web_plugins",
    "verified_member": "emix_core.hub.web_plugins",
    "render_page": "emix_core.hub.web",
    "page_message": "emix_core.hub.web:message",
    "viewer_url": "emix_core.hub.viewer",
    "to_dicom_audit_messages": "emix_core.audit.export",
    "event_row": "emix_core.audit.export",
    "audited_transfer": "emix_core.audit.transfer",
    "TransferAudit": "emix_core.audit.transfer",
    "transfer_outcome": "emix_core.audit.transfer",
    "audited_query": "emix_core.audit.transfer",
    # reports
    "Report": "emix_core.reports.model",
    "Patient": "emix_core.reports.model",
    "PersonName": "emix_core.reports.model",
    "Author": "emix_core.reports.model",
    "Code": "emix_core.reports.model",
    "Attachment": "emix_core.reports.model",
    "Identifier": "emix_core.reports.model",
    "ReportFormat": "emix_core.reports.convert",
    "report_formats": "emix_core.reports.convert",
    "parse_report": "emix_core.reports.convert",
    "render_report": "emix_core.reports.convert",
    "read_report_file": "emix_core.reports.convert",
    "sniff_report_format": "emix_core.reports.convert",
    "context_from_studies": "emix_core.reports.convert",
    "fill_from": "emix_core.reports.convert",
    "hl7_routing_header": "emix_core.reports.hl7:with_header",
    # integrity
    "sha256_file": "emix_core.crypto",
    "open_regular": "emix_core.content.safe_open",
    # command-line helpers for plugin commands
    "emit_json": "emix_core.cli.util",
    "handle_errors": "emix_core.cli.util",
    "transfer_progress": "emix_core.cli.util",
    "echo_instance_outcomes": "emix_core.cli.util",
    "home_option": "emix_core.cli.util",
    "hub_option": "emix_core.cli.util",
    "token_option": "emix_core.cli.util",
    "json_option": "emix_core.cli.util",
    "client_for": "emix_core.cli.util",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'emix_core' has no attribute {name!r}")
    module, _, attribute = module.partition(":")
    value = getattr(importlib.import_module(module), attribute or name)
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from emix_core.audit.export import event_row, to_dicom_audit_messages
    from emix_core.audit.transfer import (
        TransferAudit,
        audited_query,
        audited_transfer,
        transfer_outcome,
    )
    from emix_core.cli.util import (
        client_for,
        echo_instance_outcomes,
        emit_json,
        handle_errors,
        home_option,
        hub_option,
        json_option,
        token_option,
        transfer_progress,
    )
    from emix_core.client.home import LocalHome
    from emix_core.client.hub import PACKAGE_ID_RE, HubClient
    from emix_core.client.receiver import ReceivedPackage, receive_package
    from emix_core.client.sender import SKIPPED_NAMES, SendResult, send_paths
    from emix_core.config import resolve_home
    from emix_core.content.dicom import DicomInstance, inspect_instance, is_dicom
    from emix_core.content.disc import write_pdi_folder, write_pdi_iso
    from emix_core.content.documents import REPORT_MEDIA_TYPES, classify, safe_name
    from emix_core.content.layout import DICOM_MEDIA_TYPE, item_relative_path
    from emix_core.content.safe_open import open_regular
    from emix_core.content.samples import (
        generate_study,
        write_sample_report_pdf,
        write_sample_report_txt,
    )
    from emix_core.content.uids import is_valid_uid, new_uid
    from emix_core.crypto import sha256_file
    from emix_core.errors import (
        AuthenticationError,
        ConfigError,
        ConflictError,
        EmixError,
        HubUnavailable,
        IntegrityError,
        InvalidInput,
        LaunchRejected,
        NotAcceptable,
        NotDicomError,
        NotFoundError,
        PackageNotSealed,
        PayloadTooLarge,
        PolicyRejected,
        ReportFormatError,
        TruncatedDicomError,
        UnsafePathError,
    )
    from emix_core.gateway.inbound import package_from_folder
    from emix_core.gateway.runner import (
        Destination,
        DestinationFactory,
        Gateway,
        JournalConnections,
        ProgressiveDestination,
        Source,
        SourceFactory,
        load_gateway,
        log_event,
        open_journal,
        registered_kinds,
        retry_delay,
        time_now,
    )
    from emix_core.hub.auth import client_source, current_principal, is_allowed, require
    from emix_core.hub.reader import (
        PackageContent,
        audit_hub_event,
        hub_public_url,
        hub_settings,
        open_package,
        readable_packages,
    )
    from emix_core.hub.viewer import viewer_url
    from emix_core.hub.web import message as page_message
    from emix_core.hub.web import render_page
    from emix_core.hub.web_plugins import (
        PluginRecords,
        hub_config_table,
        hub_hooks,
        member_principal,
        sign_in_member,
        verified_member,
    )
    from emix_core.model import (
        AuditAction,
        AuditEvent,
        AuditOutcome,
        Item,
        Package,
        Principal,
        Recipient,
        is_valid_address,
        utcnow,
    )
    from emix_core.plugins import (
        Hooks,
        PluginManager,
        default_plugin_manager,
        get_plugin_manager,
        hookimpl,
        hooks_for,
    )
    from emix_core.reports.convert import (
        ReportFormat,
        context_from_studies,
        fill_from,
        parse_report,
        read_report_file,
        render_report,
        report_formats,
        sniff_report_format,
    )
    from emix_core.reports.hl7 import with_header as hl7_routing_header
    from emix_core.reports.model import (
        Attachment,
        Author,
        Code,
        Identifier,
        Patient,
        PersonName,
        Report,
    )
