"""Storage: SQLAlchemy models, engines, migrations, the repository and the window writer.

Imports without torch (the service and the dashboard read the store).
"""
