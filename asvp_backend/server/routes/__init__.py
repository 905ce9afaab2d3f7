"""The API's routers: Label Studio's ML-backend protocol (protocol.py) and the project routes (projects.py);
the status page has its own (server/ui.py). create_app includes them in every app it builds."""
