"""The live federation dashboard: a Starlette app fed by run-log records (see docs/design.md "Dashboard")."""
