"""The control plane: FastAPI app, services, database and bus."""
