"""Reports in the recipient's format: HL7 v2, CDA, FHIR, PDF, RTF and text.

:mod:`emix_core.reports.model` holds the format-neutral :class:`Report`; one module
per format reads and writes it; :mod:`emix_core.reports.builtin` offers them as a
plugin (``emix.reports``) that any installed plugin overrides; and
:mod:`emix_core.reports.convert` is the API the rest of emix calls.
"""
