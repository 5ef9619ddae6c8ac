"""Test-suite support code (real engines etc.); not collected as tests."""
