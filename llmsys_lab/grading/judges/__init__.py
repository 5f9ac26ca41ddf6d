"""Harness specs of more assignments, one module each (``ASSIGNMENT``, ``SPEC``); registered by
``llmsys_lab.grading.harness`` and hidden from the sandbox like it (they hold the references)."""
