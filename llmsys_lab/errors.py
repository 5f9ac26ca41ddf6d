"""The one base of every error the kit raises on purpose.

``except LabError`` catches what the kit means to tell you (bad input, a failed check, a scheduler that
cannot go on, a rank that died), and nothing else. Each kit error also derives from the built-in class a
caller would expect (``ValueError`` for bad arguments, ``RuntimeError`` for a state that cannot go on,
``AssertionError`` for a failed check), so existing ``except ValueError`` code keeps working.
"""
from __future__ import annotations


class LabError(Exception):
    """Base class of every exception defined in llmsys_lab."""
