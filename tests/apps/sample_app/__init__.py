"""A sample application for the zero-code tracking tests."""
