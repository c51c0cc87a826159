"""An OpenAI-compatible demo model server for ``extproc dev`` and the tests."""
