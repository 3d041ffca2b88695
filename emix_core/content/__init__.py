"""What a package holds: DICOM instances and documents recognised by content, their layout
on the receiving side, zip archives, and synthetic studies for demos and tests."""
