"""Helpers shared by the test suites: peers, validators, nodes, data.

No test module imports another; what two suites share lives here.
"""
